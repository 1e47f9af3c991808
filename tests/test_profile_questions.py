"""Questions about a profile's own fields: answered by the profile sentence, a fixed choice list."""

import itertools
import re

import pytest

from cuma_jax.data import profile_questions, prompts
from cuma_jax.data.pipeline import make_dataset
from cuma_jax.tiny.tokenizer import build_tiny_tokenizer

# The profile sentence's own wording (prompts.profile_sentence), parsed independently.
SENTENCE = re.compile(
  r"You are a person from (?P<country>.+?), age group: (?P<age_group>.+?), "
  r"gender: (?P<gender>.+?), education: (?P<education>.+?), "
  r"marital status: (?P<marital_status>.+?), religion: (?P<religion>.+?), "
  r"ethnicity: (?P<ethnicity>.+?), employment: (?P<employment>.+?)\.$"
)


def options_of(user: str) -> dict[str, str]:
  """Letter -> option text of a user turn, split at each next letter's marker in turn."""
  rest = user.split("? A. ", 1)[1].removesuffix(". " + prompts.INSTRUCTION)
  options = {}
  for letter, following in itertools.pairwise(prompts.LETTERS):
    value, *tail = rest.split(f" {following}. ", 1)
    options[letter] = value
    if not tail:
      return options
    rest = tail[0]


@pytest.fixture(scope="module")
def train(synthetic_sources):
  return synthetic_sources["train"]


@pytest.fixture(scope="module")
def questions(train):
  records = train.__getitems__(range(len(train)))
  return profile_questions.ProfileQuestions(profile_questions.profile_fields(records))


def test_each_question_is_answered_by_its_profile_sentence(questions, train):
  profiles = {r["profile"].decode() for r in train.__getitems__(range(len(train)))}
  stated = {f: {SENTENCE.match(p)[f] for p in profiles} for f in prompts.PROFILE_FIELDS}
  asked = set()
  for i in range(len(questions)):
    system, user, letter, num_choices = questions[i]
    truth = SENTENCE.match(system).groupdict()
    field = next(f for f, q in profile_questions.FIELD_QUESTIONS.items() if user.startswith(q))
    options = options_of(user)
    # Every value the training profiles state for the field, sorted, once each.
    assert list(options.values()) == sorted(stated[field]) and len(options) == num_choices
    assert options[letter] == truth[field]  # the letter names what the sentence states
    asked.add((system, field))
  # Every profile's every field with 2..26 values is asked once.
  fields = [f for f in prompts.PROFILE_FIELDS if 2 <= len(stated[f]) <= 26]
  assert len(asked) == len(questions) == len(profiles) * len(fields)
  assert "country" in fields


def test_a_field_with_more_values_than_letters_is_not_asked():
  fields = {f: "x" for f in prompts.PROFILE_FIELDS}
  many = {f"p{i}": {**fields, "ethnicity": f"group {i}", "gender": "FM"[i % 2]} for i in range(27)}
  questions = profile_questions.ProfileQuestions(many)
  assert questions.fields == ("gender",)  # one value (x) or 27 values: nothing to ask


def test_questions_are_bounded(questions):
  with pytest.raises(IndexError, match="outside"):
    questions[len(questions)]
  with pytest.raises(ValueError, match="at least one profile"):
    profile_questions.ProfileQuestions({})


def test_a_warm_up_dataset_mixes_the_survey_without_profiles_and_the_questions(
  train, questions, tmp_path
):
  corpus = [train[i]["user"].decode() for i in range(0, len(train), 5)]
  corpus += [q for i in range(0, len(questions), 3) for q in questions[i][:2]]
  tokenizer = build_tiny_tokenizer([*corpus, prompts.DEFAULT_SYSTEM_PROMPT], tmp_path)
  dataset, _ = make_dataset(
    train,
    tokenizer,
    max_length=256,
    batch_size=16,
    num_epochs=1,
    drop_remainder=False,
    profile_questions=questions,
  )
  survey = asked = 0
  for batch in dataset:
    for row in range(len(batch["input_ids"])):
      prompt = tokenizer.decode(batch["input_ids"][row][: batch["prompt_length"][row] + 1])
      answer = tokenizer.decode(batch["targets"][row][batch["loss_mask"][row].astype(bool)])
      if prompt.startswith(f"<|im_start|>system\n{prompts.DEFAULT_SYSTEM_PROMPT}"):
        survey += 1  # a survey question never shows the profile
      else:
        system = prompt.split("\n")[1].split("<|im_end|>")[0]
        user = prompt.split("user\n")[1].split("<|im_end|>")[0]
        field = next(f for f, q in profile_questions.FIELD_QUESTIONS.items() if q in user)
        assert options_of(user)[answer.removesuffix("<|im_end|>")] == SENTENCE.match(system)[field]
        asked += 1
  # Each question repeated until they are about as many as the survey's examples.
  repeats = max(1, round(len(train) / len(questions)))
  assert (survey, asked) == (len(train), repeats * len(questions))
