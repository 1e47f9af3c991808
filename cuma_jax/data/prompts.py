"""The exact prompt strings of CuMA's WorldValuesBench recipe (docs/data.md#prompts).

The strings follow the authors' released preprocessing character for character:

    user:   "{question}? A. {choice_1} B. {choice_2} ... {L}. {choice_n}. You can only choose one
             option."
    system: DEFAULT_SYSTEM_PROMPT, or the demographic sentence of `profile_sentence`.

Two details come from the released code rather than the paper's prose: a full stop follows the
last choice (".. D. Not at all important. You can only ..."), and "?" is appended to the
question unconditionally, so a question text that already ends in "?" gets "??". WVB's codebook
labels (e.g. "Important in life: Family") almost never end in "?"; keeping the released behaviour
makes prompts byte-identical to the authors' data instead of silently differing on a few items.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import string

LETTERS = string.ascii_uppercase
MAX_OPTIONS = len(LETTERS)

# Closes every user turn (the released prompt).
INSTRUCTION = "You can only choose one option."
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant that answers survey questions honestly."

# Profile fields in the order the demographic sentence names them, and their WVB columns.
PROFILE_FIELDS = (
  "country",
  "age_group",
  "gender",
  "education",
  "marital_status",
  "religion",
  "ethnicity",
  "employment",
)
WVB_PROFILE_COLUMNS = {
  "country": "B_COUNTRY",
  "age_group": "X003R",
  "gender": "Q260",
  "education": "Q275",
  "marital_status": "Q273",
  "religion": "Q289",
  "ethnicity": "Q290",
  "employment": "Q279",
}


def age_group_text(x003r: str) -> str:
  """WVB's X003R value as the prompt states it: "16-24 years" -> "16-24 years old"."""
  return x003r.replace(" years", " years old") if x003r.endswith("years") else x003r


def profile_sentence(profile: Mapping[str, str]) -> str:
  """The demographic system prompt; also the text the demographic encoder embeds."""
  return (
    f"You are a person from {profile['country']}, "
    f"age group: {profile['age_group']}, "
    f"gender: {profile['gender']}, "
    f"education: {profile['education']}, "
    f"marital status: {profile['marital_status']}, "
    f"religion: {profile['religion']}, "
    f"ethnicity: {profile['ethnicity']}, "
    f"employment: {profile['employment']}."
  )


def user_prompt(question: str, choices: Sequence[str]) -> str:
  """The user turn: the question, lettered choices (codes ascending) and the instruction."""
  if not 1 <= len(choices) <= MAX_OPTIONS:
    raise ValueError(f"a question needs 1..{MAX_OPTIONS} choices, got {len(choices)}")
  # LETTERS outnumbers a question's choices: one letter per choice.
  lettered = " ".join(
    f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices, strict=False)
  )
  return f"{question}? {lettered}. {INSTRUCTION}"


def system_prompt(profile: str, demographic_system_prompt: bool) -> str:
  """The system turn: the profile sentence if demographics go in the prompt, else the default."""
  return profile if demographic_system_prompt else DEFAULT_SYSTEM_PROMPT


def chat_messages(system: str, user: str, answer: str | None = None) -> list[dict[str, str]]:
  """System + user (+ assistant) messages in the Hugging Face chat-template format."""
  messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
  if answer is not None:
    messages.append({"role": "assistant", "content": answer})
  return messages
