"""Synthetic preference data with known per-culture preferences (docs/preference.md#synthetic-preferences).

Why: the preference half of the paper (chat SFT, DPO, GRPO, CA accuracy, judged win-rate)
needs data where the reply a user prefers is known exactly, so that a rule can judge replies
and the best achievable accuracy is known; Community Alignment and PRISM cannot be shipped.

The generative model:
- K latent cultures of unequal size (weights proportional to K, K-1, ..., 1), each with a few
  home countries; a user's culture is their country's. The profile reads like the real
  datasets' ("Country: Japan, Age: 25-34, Gender: Female"), the culture is never written.
- Questions about everyday choices, each with four short replies. Culture c prefers reply o
  of question q with probability p_c(q)[o]: ``mode_probability`` on its own modal reply, the
  rest spread evenly. The cultures' modal replies differ (conflicting modes), so the
  population's modal reply is the largest culture's, and a profile-blind model (mean
  collapse) answers every user with it.
- Each user answers every question once: one single-turn conversation per (user, question).
  The chosen reply is DRAWN from p_c(q) (noisy preferences, as annotators are); each other
  reply gives one DPO pair (chosen, rejected).
- Each conversation is also written as a Community-Alignment-style choice between the four
  replies lettered A-D (the persona prompt of the CA accuracy evaluation, the answer the
  chosen reply's letter) so that a tiny model learns that format during chat SFT; the CA
  accuracy rows of the test conversations ask the same with the preferred letter drawn from
  p_c(q). The accuracy ceiling is mean max p_c = ``mode_probability``.

:class:`PreferenceOracle` (saved beside the prepared dataset) holds p_c(q), each profile's
culture and the question table; the rule judge and the reference predictors read it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from cuma_jax import fields
from cuma_jax.data import ca_prompts
from cuma_jax.data.preference_sources import SYNTHETIC, make_record
from cuma_jax.fields import field

ORACLE_FILENAME = "preference_oracle.json"
SOURCE = SYNTHETIC

# (question, four replies): everyday choices on which cultures plausibly differ.
QUESTIONS = (
  ("How should I spend a free Sunday?", ("Visit my family.", "Go hiking.", "Rest at home.", "Meet friends in town.")),
  ("What should I cook for guests?", ("A rice dish.", "Roast meat.", "Fresh salads.", "A big soup.")),
  ("How should I greet my new boss?", ("With a bow.", "With a firm handshake.", "With a warm hug.", "With a polite nod.")),
  ("What gift should I bring to a wedding?", ("Money in an envelope.", "Something for the home.", "Fine wine.", "A handmade gift.")),
  ("How should I pick a job?", ("Choose stable pay.", "Follow my passion.", "Stay near my family.", "Pick the best title.")),
  ("How should I settle a dispute with a neighbour?", ("Ask an elder to help.", "Talk to them directly.", "Write them a letter.", "Let it pass quietly.")),
  ("Where should I save money?", ("In gold.", "In a bank account.", "In land.", "In shares.")),
  ("How should I raise my children?", ("With strict rules.", "With a lot of freedom.", "With religious values.", "With help from grandparents.")),
  ("What should I do on my birthday?", ("Have a family dinner.", "Throw a party.", "Travel somewhere.", "Keep it quiet.")),
  ("How should I dress for an interview?", ("In a dark suit.", "In smart casual clothes.", "In traditional dress.", "In my usual clothes.")),
  ("How should I choose a partner?", ("Trust my parents.", "Follow my heart.", "Meet through my faith.", "Use a dating app.")),
  ("How should I care for my old parents?", ("Let them live with me.", "Find a good care home.", "Visit them every week.", "Pay for a helper.")),
  ("What should I read to relax?", ("Poetry.", "A crime novel.", "The news.", "Holy texts.")),
  ("How should I spend a bonus?", ("Give some to family.", "Take a holiday.", "Pay off debts.", "Buy something nice.")),
  ("How should I celebrate a new year?", ("With fireworks.", "At a place of worship.", "With a quiet meal.", "At a street party.")),
  ("How should I talk to a teacher?", ("Very formally.", "Like a friend.", "Only when asked.", "Through my parents.")),
)  # fmt: skip
CULTURE_COUNTRIES = (
  ("Japan", "South Korea", "Vietnam"),
  ("United States", "Canada", "Australia"),
  ("Egypt", "Jordan", "Morocco"),
  ("Brazil", "Mexico", "Argentina"),
  ("Sweden", "Netherlands", "Germany"),
  ("India", "Pakistan", "Indonesia"),
)
AGE_GROUPS = ("18-24", "25-34", "35-44", "45-54", "55-64", "65+")
GENDERS = ("Female", "Male")


@dataclasses.dataclass(frozen=True)
class SyntheticPreferenceConfig:
  """Sizes and sharpness of the synthetic preference data (``data.synthetic_preference``)."""

  seed: int = field(0)
  # At most four: each culture has its own modal reply among the four.
  num_cultures: int = field(4, low=2, high=4)
  num_questions: int = field(16, low=1, high=len(QUESTIONS))
  countries_per_culture: int = field(2, low=1, high=len(CULTURE_COUNTRIES[0]))
  num_users: int = field(200, low=2)
  # P(the culture's modal reply); the other three share the rest evenly.
  mode_probability: float = field(0.7, low=0.25, high=1)

  def __post_init__(self):
    fields.check(self, "data.synthetic_preference")


@dataclasses.dataclass(frozen=True)
class PreferenceOracle:
  """What the synthetic data was drawn from.

  questions: the question texts; replies: [Q][4] reply texts;
  preference: [K, Q, 4] p_c(q); culture_weights: [K] population shares;
  culture_of_profile: profile string -> culture index.
  """

  questions: tuple[str, ...]
  replies: tuple[tuple[str, ...], ...]
  preference: np.ndarray
  culture_weights: np.ndarray
  culture_of_profile: dict[str, int]

  def question_index(self, question: str) -> int:
    try:
      return self.questions.index(question.strip())
    except ValueError:
      raise KeyError(f"{question!r} is not a question of the synthetic preference data") from None

  def distribution(self, profile: str, question: str) -> np.ndarray:
    """[4] p_c(q) of the profile's culture."""
    return self.preference[self.culture_of_profile[profile], self.question_index(question)]

  def reply(self, question: str, option: int) -> str:
    """The text of the question's reply ``option``."""
    return self.replies[self.question_index(question)][option]

  def population_reply(self, question: str) -> int:
    """The reply a profile-blind model prefers: the population's mode."""
    return int(np.argmax(self.culture_weights @ self.preference[:, self.question_index(question)]))

  def reply_option(self, question: str, reply: str) -> int | None:
    """The reply's option index (a reply that starts with an option's text, compared without
    case, spaces and punctuation), or None if it names none."""
    text = _normalise(reply)
    for option, candidate in enumerate(self.replies[self.question_index(question)]):
      if text and text.startswith(_normalise(candidate)):
        return option
    return None

  def to_json(self) -> dict[str, Any]:
    return {
      "questions": list(self.questions),
      "replies": [list(r) for r in self.replies],
      "preference": self.preference.tolist(),
      "culture_weights": self.culture_weights.tolist(),
      "culture_of_profile": self.culture_of_profile,
    }

  @classmethod
  def load(cls, path: str | Path) -> PreferenceOracle:
    """Reads the oracle file (or the directory holding it)."""
    path = Path(path)
    data = json.loads((path / ORACLE_FILENAME if path.is_dir() else path).read_text("utf-8"))
    return cls(
      questions=tuple(data["questions"]),
      replies=tuple(tuple(r) for r in data["replies"]),
      preference=np.asarray(data["preference"], np.float64),
      culture_weights=np.asarray(data["culture_weights"], np.float64),
      culture_of_profile={p: int(c) for p, c in data["culture_of_profile"].items()},
    )


def _normalise(text: str) -> str:
  return "".join(ch for ch in text.lower() if ch.isalnum())


def generate(config: SyntheticPreferenceConfig) -> tuple[dict[str, list[dict]], PreferenceOracle]:
  """Records {"sft", "dpo", "ca"} of every conversation (split later by conversation) and
  the oracle; deterministic in ``config.seed``.

  Every draw comes from one generator, in this order: the cultures' modal replies, each
  user's culture, then per user their profile and per question the reply they chose and the
  one their CA row asks for. Reordering them changes every dataset.
  """
  rng = np.random.default_rng(config.seed)
  k = config.num_cultures
  weights = np.arange(k, 0, -1, dtype=np.float64)
  weights /= weights.sum()
  preference = _culture_preferences(rng, config)
  cultures = rng.choice(k, size=config.num_users, p=weights)
  cultures[:k] = np.arange(k)  # every culture has a user
  oracle_profiles: dict[str, int] = {}
  records: dict[str, list[dict]] = {"sft": [], "dpo": [], "ca": []}
  questions = QUESTIONS[: config.num_questions]
  for user, culture in enumerate(cultures):
    profile_fields = {
      "Country": CULTURE_COUNTRIES[culture][rng.integers(config.countries_per_culture)],
      "Age": AGE_GROUPS[rng.integers(len(AGE_GROUPS))],
      "Gender": GENDERS[rng.integers(len(GENDERS))],
    }
    profile = ", ".join(f"{name}: {value}" for name, value in profile_fields.items())
    oracle_profiles[profile] = int(culture)
    for qi, (question, replies) in enumerate(questions):
      chosen = int(rng.choice(4, p=preference[culture, qi]))
      target = int(rng.choice(4, p=preference[culture, qi]))
      conversation = _Conversation(
        f"u{user:04d}q{qi:02d}", f"q{qi:02d}", profile, profile_fields, question, replies
      )
      for kind, rows in conversation.records(chosen, target).items():
        records[kind].extend(rows)
  oracle = PreferenceOracle(
    questions=tuple(t for t, _ in questions),
    replies=tuple(r for _, r in questions),
    preference=preference,
    culture_weights=weights,
    culture_of_profile=oracle_profiles,
  )
  return records, oracle


def _culture_preferences(rng, config: SyntheticPreferenceConfig) -> np.ndarray:
  """p_c(q) [K, Q, 4]: ``mode_probability`` on each culture's modal reply (distinct between
  cultures for every question), the rest spread evenly."""
  k, q = config.num_cultures, config.num_questions
  modes = np.stack([rng.permutation(4)[:k] for _ in range(q)], 1)
  rest = (1.0 - config.mode_probability) / 3
  preference = np.full((k, q, 4), rest)
  np.put_along_axis(preference, modes[..., None], config.mode_probability, axis=-1)
  return preference


@dataclasses.dataclass(frozen=True)
class _Conversation:
  """One user's single-turn conversation about one question."""

  conversation: str
  question_id: str
  profile: str
  profile_fields: dict[str, str]
  question: str
  replies: tuple[str, ...]

  def records(self, chosen: int, target: int) -> dict[str, list[dict]]:
    """Its records: chat SFT on the chosen reply and on its letter among the four (the CA
    format), a DPO pair against each other reply, and the CA row asking for ``target``."""
    system = {"role": "system", "content": f"User Profile: {self.profile}"}
    user_turn = {"role": "user", "content": self.question}
    reply = {"role": "assistant", "content": self.replies[chosen]}
    row = dict(
      profile=self.profile, question=self.question, options=list(self.replies), answer=chosen
    )
    choice = [
      *ca_prompts.ca_messages(row, "persona"),
      {"role": "assistant", "content": "ABCD"[chosen]},
    ]
    return {
      "sft": [
        self._record(0, messages=json.dumps([system, user_turn, reply]), chosen_option=chosen),
        self._record(1, messages=json.dumps(choice), chosen_option=chosen),
      ],
      "dpo": [
        self._record(
          pair,
          messages=json.dumps([system, user_turn]),
          chosen=self.replies[chosen],
          rejected=self.replies[rejected],
          chosen_option=chosen,
        )
        for pair, rejected in enumerate(o for o in range(4) if o != chosen)
      ],
      "ca": [self._record(0, question=self.question, options=list(self.replies), answer=target)],
    }

  def _record(self, index: int, **values) -> dict:
    return make_record(
      SOURCE,
      self.conversation,
      0,
      index,
      **values,
      question_id=self.question_id,
      profile=self.profile,
      profile_fields=json.dumps(self.profile_fields),
    )


def write_oracle(oracle: PreferenceOracle, directory: str | Path) -> Path:
  path = Path(directory) / ORACLE_FILENAME
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(oracle.to_json()), encoding="utf-8")
  return path
