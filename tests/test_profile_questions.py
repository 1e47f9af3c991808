"""Questions about a profile's own fields: answered by the profile sentence, letters uniform."""

import collections
import re

import numpy as np
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
  for letter, following in zip(prompts.LETTERS, prompts.LETTERS[1:]):
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
  return profile_questions.ProfileQuestions(profile_questions.profile_fields(records), seed=3)


def test_each_question_is_answered_by_its_profile_sentence(questions):
  letters = collections.Counter()
  for i in range(len(questions)):
    system, user, letter, num_choices = questions[i]
    truth = SENTENCE.match(system).groupdict()
    field = prompts.PROFILE_FIELDS[i % len(prompts.PROFILE_FIELDS)]
    assert user.startswith(profile_questions.FIELD_QUESTIONS[field] + "? A. ")
    options = options_of(user)
    assert list(options) == list(prompts.LETTERS[: len(options)])
    assert 2 <= len(options) == num_choices <= profile_questions.NUM_CHOICES
    assert len(set(options.values())) == len(options)  # no value offered twice
    assert options[letter] == truth[field]  # the letter names what the sentence states
    letters[letter] += 1
  # Every profile's every field is asked once, and the right letter is spread evenly.
  assert len(questions) == len({questions[i][0] for i in range(len(questions))}) * 8
  shares = np.array([letters[c] for c in "ABCD"]) / sum(letters.values())
  assert shares.min() > 0.17, shares


def test_questions_are_deterministic_and_bounded(questions, train):
  records = train.__getitems__(range(len(train)))
  again = profile_questions.ProfileQuestions(profile_questions.profile_fields(records), seed=3)
  assert [again[i] for i in range(40)] == [questions[i] for i in range(40)]
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
        assert SENTENCE.match(system), system
        options = options_of(prompt.split("user\n")[1].split("<|im_end|>")[0])
        field = next(f for f, q in profile_questions.FIELD_QUESTIONS.items() if q in prompt)
        assert options[answer.removesuffix("<|im_end|>")] == SENTENCE.match(system)[field]
        asked += 1
  assert (survey, asked) == (len(train), len(questions))
