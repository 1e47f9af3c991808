"""Win-rate judging: the prompt, verdicts, position swaps and the tally, against hand-worked
cases and the specification's wording."""

import numpy as np
import pytest
from scipy import stats

from cuma_jax.evaluation import judging


@pytest.mark.parametrize(
  "text, verdict",
  [
    ("[[A]]", "A"),
    ("Verdict: [[B]] because ... not [[A]]", "B"),  # the first marker wins
    ("I would say [[Tie]]. Then [[A]]", "tie"),
    ("Response A is better.", "tie"),  # no marker: a tie
    ("[[a]] or [A] or [[ B ]]", "tie"),  # only the exact markers count
    ("", "tie"),
  ],
)
def test_parse_verdict_reads_the_first_marker(text, verdict):
  assert judging.parse_verdict(text) == verdict


def test_outcome_for_the_model_follows_its_position():
  # (verdict, swapped) -> outcome, written out: the model is A unless swapped.
  table = {
    ("A", False): "win",
    ("B", False): "loss",
    ("A", True): "loss",
    ("B", True): "win",
    ("tie", False): "tie",
    ("tie", True): "tie",
  }
  for (verdict, swapped), outcome in table.items():
    assert judging.model_outcome(verdict, swapped) == outcome
    case = judging.arrange("p", "c", "model", "base", swapped)
    shown_model = case.response_b if swapped else case.response_a
    assert shown_model == "model"
  with pytest.raises(ValueError, match="verdict 'C'"):
    judging.model_outcome("C", False)


def test_ties_count_as_losses():
  outcomes = ["win"] * 3 + ["loss"] * 2 + ["tie"] * 5
  assert judging.win_rate(outcomes) == {"wins": 3, "losses": 2, "ties": 5, "win_rate": 0.3}
  with pytest.raises(ValueError, match="at least one"):
    judging.win_rate([])
  with pytest.raises(ValueError, match="'draw'"):
    judging.win_rate(["win", "draw"])


def test_position_swaps_are_seeded_and_fair():
  swaps = judging.position_swaps(4000, seed=7)
  np.testing.assert_array_equal(swaps, judging.position_swaps(4000, seed=7))
  assert not np.array_equal(swaps, judging.position_swaps(4000, seed=8))
  assert stats.binomtest(int(swaps.sum()), len(swaps), 0.5).pvalue > 1e-3


def test_judge_prompt_has_the_demonstrations_then_the_case():
  demo = judging.Case("Egypt, 30", "Hi", "chosen reply", "rejected reply")
  case = judging.Case("Peru, 60", "Hello", "one", "two")
  expected = (
    "Example 1:\nProfile: Egypt, 30\nContext: Hi\nResponse A: chosen reply\n"
    "Response B: rejected reply\nVerdict: [[A]]\n\n"
    "---\n\nNow, please evaluate the following case:\n\n"
    "Profile: Peru, 60\nContext: Hello\nResponse A: one\nResponse B: two\n\n"
    "Which response is better? Output [[A]], [[B]], or [[Tie]]."
  )
  assert judging.judge_user_prompt(case, [demo]) == expected
  assert judging.judge_user_prompt(case).startswith("Profile: Peru, 60\n")
  assert "culturally aware judge" in judging.JUDGE_SYSTEM_PROMPT


def test_released_judge_prompt_is_the_release_s_text():
  # The released evaluate_dpo.py's format_judge_prompt, written out: a header line, each
  # demonstration closed by a blank line, then "---" and the case.
  demo = judging.Case("Egypt, 30", "<|im_start|>user\nHi<|im_end|>\n", "chosen", "rejected")
  case = judging.Case("Peru, 60", "<|im_start|>user\nHello<|im_end|>\n", "one", "two")
  expected = (
    "Here are some examples of preferences for different users:\n\n"
    "Example 1:\nProfile: Egypt, 30\nContext: <|im_start|>user\nHi<|im_end|>\n\n"
    "Response A: chosen\nResponse B: rejected\nVerdict: [[A]]\n\n"
    "---\n\nNow, please evaluate the following case:\n"
    "Profile: Peru, 60\nContext: <|im_start|>user\nHello<|im_end|>\n\n"
    "Response A: one\nResponse B: two\n\n"
    "Which response is better? Output [[A]], [[B]], or [[Tie]]."
  )
  assert judging.released_judge_user_prompt(case, [demo]) == expected
  assert judging.USER_PROMPTS["released"] is judging.released_judge_user_prompt


def test_grpo_reward_prompt_shows_the_reference_first():
  case = judging.Case("Country: Peru", "user: Hi?", "I cannot answer.", "Hello!")
  assert judging.reward_user_prompt(case, [case]) == (
    "Profile: Country: Peru\nContext: user: Hi?\nResponse A (reference): I cannot answer.\n"
    "Response B (candidate): Hello!\n\n"
    "Which response is better for this user? Output [[A]], [[B]], or [[Tie]]."
  )
  messages = judging.judge_messages(case, (), judging.reward_user_prompt)
  assert messages[0] == {"role": "system", "content": judging.JUDGE_SYSTEM_PROMPT}
  assert messages[1]["content"].endswith(
    "Which response is better for this user? Output [[A]], [[B]], or [[Tie]]."
  )


@pytest.mark.parametrize(
  "text, reward",
  [
    ("[[B]]", 1.0),
    ("[[A]] ... no, [[B]]", 1.0),  # [[B]] is looked for first, anywhere
    ("[[Tie]] or [[B]]", 1.0),
    ("[[Tie]]", 0.5),
    ("[[A]]", 0.0),
    ("Response B is better.", 0.0),  # unparsable: 0 (the win-rate calls it a tie)
    ("", 0.0),
  ],
)
def test_grpo_reward_reads_the_output_as_the_release_does(text, reward):
  assert judging.reward_from_output(text) == reward


class _Writer:
  """A judge that writes the given outputs (as a local LM judge does)."""

  def __init__(self, texts):
    self.texts = texts

  def outputs(self, cases):
    return self.texts[: len(cases)]

  def __call__(self, cases):
    return [judging.parse_verdict(t) for t in self.outputs(cases)]


def test_grpo_rewards_of_a_writing_judge_come_from_its_outputs():
  case = judging.Case("p", "c", "reference", "candidate")
  texts = ["no verdict", "[[A]] then [[B]]", "[[Tie]]", "[[A]]"]
  assert judging.rewards(_Writer(texts), [case] * 4) == [0.0, 1.0, 0.5, 0.0]
  # A judge without outputs (the rule judge) is read by its verdicts.
  assert judging.rewards(lambda cases: ["B", "tie", "A"], [case] * 3) == [1.0, 0.5, 0.0]
