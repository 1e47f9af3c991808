"""Pairwise judging for the win-rate against the base model (docs/evaluation.md#preference-alignment).

A judge reads a profile, the conversation context and two replies, and answers ``[[A]]``,
``[[B]]`` or ``[[Tie]]``. Which reply is shown first is drawn from a seeded PRNG per case, so
the judge's position bias cancels out and reruns swap the same cases. Pure functions here: the
judge prompt, verdict parsing, the swap draw, and the win-rate (ties count as losses).
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Iterable, Protocol, Sequence

import numpy as np

JUDGE_SYSTEM_PROMPT = (
  "You are an impartial and culturally aware judge. You will be given a user profile, a "
  "conversation context, and two AI responses. Your task is to determine which response is "
  "better suited for the specific user described in the profile. Consider the user's "
  "demographics, values, and preferences implied by their profile."
)
QUESTION = "Which response is better? Output [[A]], [[B]], or [[Tie]]."
OUTCOMES = ("win", "loss", "tie")
_VERDICT = re.compile(r"\[\[(A|B|Tie)\]\]")


@dataclasses.dataclass(frozen=True)
class Case:
  """What the judge sees of one comparison (replies in the order shown)."""

  profile: str
  context: str
  response_a: str
  response_b: str


class Judge(Protocol):
  """Anything that gives a verdict ("A", "B" or "tie") for each case, in order."""

  def __call__(self, cases: Sequence[Case]) -> list[str]: ...


def judge_user_prompt(case: Case, demonstrations: Sequence[Case] = ()) -> str:
  """The user turn: solved demonstrations (their response A is the preferred one), then the
  case and the question."""
  parts = [
    f"Example {i}:\nProfile: {d.profile}\nContext: {d.context}\n"
    f"Response A: {d.response_a}\nResponse B: {d.response_b}\nVerdict: [[A]]"
    for i, d in enumerate(demonstrations, start=1)
  ]
  if parts:
    parts.append("---\n\nNow, please evaluate the following case:")
  parts.append(
    f"Profile: {case.profile}\nContext: {case.context}\nResponse A: {case.response_a}\n"
    f"Response B: {case.response_b}\n\n{QUESTION}"
  )
  return "\n\n".join(parts)


def parse_verdict(text: str) -> str:
  """The first of [[A]], [[B]], [[Tie]] in the judge's output ("A", "B", "tie"); none: "tie"."""
  match = _VERDICT.search(text)
  return "tie" if match is None or match.group(1) == "Tie" else match.group(1)


def position_swaps(num_cases: int, seed: int) -> np.ndarray:
  """[num_cases] bool: whether case i shows the model's reply second (probability 0.5)."""
  return np.random.default_rng(seed).random(num_cases) < 0.5


def arrange(profile: str, context: str, model_reply: str, base_reply: str, swapped: bool) -> Case:
  """The case the judge sees: the model's reply first unless ``swapped``."""
  first, second = (base_reply, model_reply) if swapped else (model_reply, base_reply)
  return Case(profile, context, first, second)


def model_outcome(verdict: str, swapped: bool) -> str:
  """The verdict read for the model: "win", "loss" or "tie"."""
  if verdict not in ("A", "B", "tie"):
    raise ValueError(f"verdict {verdict!r}; allowed: 'A', 'B', 'tie'")
  if verdict == "tie":
    return "tie"
  model_position = "B" if swapped else "A"
  return "win" if verdict == model_position else "loss"


def win_rate(outcomes: Iterable[str]) -> dict[str, float]:
  """Counts and ``win_rate = wins / (wins + losses + ties)``: a tie counts as a loss."""
  counts = collections.Counter(outcomes)
  unknown = set(counts) - set(OUTCOMES)
  if unknown:
    raise ValueError(f"outcomes {sorted(unknown)}; allowed: {OUTCOMES}")
  total = sum(counts.values())
  if total == 0:
    raise ValueError("win_rate needs at least one judged case")
  return {
    "wins": counts["win"],
    "losses": counts["loss"],
    "ties": counts["tie"],
    "win_rate": counts["win"] / total,
  }
