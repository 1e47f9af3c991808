"""Pairwise judging for the win-rate against the base model (docs/evaluation.md#preference-alignment).

A judge reads a profile, the conversation context and two replies, and answers ``[[A]]``,
``[[B]]`` or ``[[Tie]]``. Which reply is shown first is drawn from a seeded PRNG per case, so
the judge's position bias cancels out and reruns swap the same cases. Pure functions: the
judge prompt and its chat messages, verdict parsing, the swap draw, the win-rate (ties count
as losses) and the GRPO reward read off a judge's output. `LocalLMJudge` is a judge that runs
a local causal LM with this package's cached generation (greedy, a few tokens), so judging needs no
remote API and is reproducible.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
import copy
import dataclasses
import json
import os
import re
from typing import Protocol

import jax.numpy as jnp
import numpy as np

from cuma_jax.data.tokenize import pad_id, render_prompt
from cuma_jax.generation import SamplingConfig, generate, pad_prompts
from cuma_jax.models.pretrained import load_pretrained, load_tokenizer

JUDGE_SYSTEM_PROMPT = (
  "You are an impartial and culturally aware judge. You will be given a user profile, a "
  "conversation context, and two AI responses. Your task is to determine which response is "
  "better suited for the specific user described in the profile. Consider the user's "
  "demographics, values, and preferences implied by their profile."
)
QUESTION = "Which response is better? Output [[A]], [[B]], or [[Tie]]."
REWARD_QUESTION = "Which response is better for this user? Output [[A]], [[B]], or [[Tie]]."
OUTCOMES = ("win", "loss", "tie")
_VERDICT = re.compile(r"\[\[(A|B|Tie)\]\]")
# GRPO shows the reference reply as A and the candidate as B: the candidate's reward.
_REWARD = {"B": 1.0, "tie": 0.5, "A": 0.0}


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


def released_judge_user_prompt(case: Case, demonstrations: Sequence[Case] = ()) -> str:
  """The released evaluation's user turn, character for character: its header line, the
  demonstrations, and the case (whose context, there, is the templated prompt)."""
  parts = ["Here are some examples of preferences for different users:\n\n"]
  parts += [
    f"Example {i}:\nProfile: {d.profile}\nContext: {d.context}\n"
    f"Response A: {d.response_a}\nResponse B: {d.response_b}\nVerdict: [[A]]\n\n"
    for i, d in enumerate(demonstrations, start=1)
  ]
  parts.append(
    "---\n\nNow, please evaluate the following case:\n"
    f"Profile: {case.profile}\nContext: {case.context}\nResponse A: {case.response_a}\n"
    f"Response B: {case.response_b}\n\n{QUESTION}"
  )
  return "".join(parts)


# preference.eval.judge_prompt: the win-rate judge's user turn.
JUDGE_PROMPTS = ("project", "released")
USER_PROMPTS = {"project": judge_user_prompt, "released": released_judge_user_prompt}


def reward_user_prompt(case: Case, demonstrations: Sequence[Case] = ()) -> str:
  """GRPO's reward question: response A is the reference reply, B the sampled candidate
  (no demonstrations)."""
  del demonstrations
  return (
    f"Profile: {case.profile}\nContext: {case.context}\n"
    f"Response A (reference): {case.response_a}\nResponse B (candidate): {case.response_b}"
    f"\n\n{REWARD_QUESTION}"
  )


def judge_messages(
  case: Case, demonstrations: Sequence[Case] = (), user_prompt=judge_user_prompt
) -> list[dict[str, str]]:
  """The judge's chat: the system prompt, then the user turn (by default the win-rate's,
  :func:`judge_user_prompt`; GRPO's rewards ask :func:`reward_user_prompt`)."""
  return [
    {"role": "system", "content": JUDGE_SYSTEM_PROMPT},
    {"role": "user", "content": user_prompt(case, demonstrations)},
  ]


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


def reward_from_verdict(verdict: str) -> float:
  """GRPO's reward for the candidate, which the judge always sees as B: 1, 0.5 (tie) or 0."""
  if verdict not in _REWARD:
    raise ValueError(f"verdict {verdict!r}; allowed: 'A', 'B', 'tie'")
  return _REWARD[verdict]


def reward_from_output(text: str) -> float:
  """GRPO's reward read off a judge's raw output as the release reads it: 1 if it holds
  ``[[B]]`` anywhere (checked first), else 0.5 for ``[[Tie]]``, else 0 (``[[A]]`` or an
  unparsable output, which the win-rate's :func:`parse_verdict` counts as a tie)."""
  if "[[B]]" in text:
    return 1.0
  return 0.5 if "[[Tie]]" in text else 0.0


def rewards(judge: Judge, cases: Sequence[Case]) -> list[float]:
  """GRPO's rewards of the candidates (B): from the raw outputs of a judge that writes text
  (``judge.outputs``, e.g. :class:`LocalLMJudge`), else from its verdicts (the rule judge)."""
  outputs = getattr(judge, "outputs", None)
  if outputs is not None:
    return [reward_from_output(t) for t in outputs(cases)]
  return [reward_from_verdict(v) for v in judge(cases)]


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


def end_of_turn_ids(tokenizer, directory=None) -> tuple[int, ...]:
  """The tokenizer's EOS and the ids the checkpoint's generation config ends replies with
  (Qwen3: <|im_end|> and <|endoftext|>; Llama 3 Instruct: <|eot_id|> and <|end_of_text|>)."""
  ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
  path = None if directory is None else os.path.join(directory, "generation_config.json")
  if path is not None and os.path.exists(path):
    with open(path) as f:
      eos = json.load(f).get("eos_token_id")
    ids += [eos] if isinstance(eos, int) else list(eos or ())
  if not ids:
    raise ValueError("the judge's tokenizer has no EOS token to end its replies; pass stop_tokens")
  return tuple(dict.fromkeys(ids))


class LocalLMJudge:
  """A local Hugging Face causal LM (any architecture `load_pretrained` reads) as the judge.

  Each case becomes the chat of :func:`judge_messages`, rendered with the tokenizer's chat
  template (generation prompt, thinking disabled) and decoded greedily for at most
  ``max_new_tokens`` tokens, stopping at an end-of-turn token; :func:`parse_verdict` reads the
  reply. ``last_outputs`` holds the decoded replies of the last call, to be saved with the
  verdicts. ``stop_tokens`` None: the tokenizer's EOS and, when the checkpoint directory has
  one, its generation config's EOS ids.
  """

  def __init__(
    self,
    directory: str | os.PathLike,
    *,
    demonstrations: Sequence[Case] = (),
    batch_size: int = 8,
    max_new_tokens: int = 16,
    dtype="float32",
    stop_tokens: Sequence[int] | None = None,
  ):
    directory = os.fspath(directory)
    module, params = load_pretrained(directory, jnp.dtype(dtype))
    tokenizer = load_tokenizer(directory)
    if stop_tokens is None:
      stop_tokens = end_of_turn_ids(tokenizer, directory)
    self._setup(module, params, tokenizer, demonstrations, batch_size, max_new_tokens, stop_tokens)

  @classmethod
  def from_loaded(
    cls,
    module,
    params,
    tokenizer,
    *,
    demonstrations: Sequence[Case] = (),
    batch_size: int = 8,
    max_new_tokens: int = 16,
    stop_tokens: Sequence[int] | None = None,
  ) -> LocalLMJudge:
    """A judge over an already loaded ``(module, params)`` and its tokenizer."""
    judge = cls.__new__(cls)
    if stop_tokens is None:
      stop_tokens = end_of_turn_ids(tokenizer)
    judge._setup(module, params, tokenizer, demonstrations, batch_size, max_new_tokens, stop_tokens)
    return judge

  def _setup(self, module, params, tokenizer, demonstrations, batch_size, max_new_tokens, stop):
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size}; must be at least 1")
    self.module, self.params, self.tokenizer = module, params, tokenizer
    self.demonstrations = tuple(demonstrations)
    self.user_prompt = judge_user_prompt
    self.batch_size = batch_size
    self.sampling = SamplingConfig(
      max_new_tokens=max_new_tokens,
      temperature=0.0,
      stop_tokens=tuple(stop),
      pad_token=pad_id(tokenizer),
    )
    self.last_outputs: list[str] = []

  def with_prompt(self, user_prompt) -> LocalLMJudge:
    """This judge (the same loaded model) asking ``user_prompt(case, demonstrations)``."""
    judge = copy.copy(self)
    judge.user_prompt = user_prompt
    return judge

  def __call__(self, cases: Sequence[Case]) -> list[str]:
    """The verdict ("A", "B" or "tie") for each case, in order."""
    return [parse_verdict(t) for t in self.outputs(cases)]

  def outputs(self, cases: Sequence[Case]) -> list[str]:
    """The judge's decoded reply to each case, in order."""
    conversations = [judge_messages(c, self.demonstrations, self.user_prompt) for c in cases]
    return self.complete(conversations)

  def encode(self, conversations: Sequence[Sequence[dict[str, str]]]) -> list[list[int]]:
    """Each chat's prompt ids: rendered with the generation prompt, thinking disabled."""
    return [
      self.tokenizer(render_prompt(self.tokenizer, m), add_special_tokens=False)["input_ids"]
      for m in conversations
    ]

  def complete(self, conversations: Sequence[Sequence[dict[str, str]]]) -> list[str]:
    """The judge's decoded reply to each chat (special tokens dropped), kept in
    ``last_outputs``. Prompts of similar length are batched together (left padded)."""
    prompts = self.encode(conversations)
    outputs = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for start in range(0, len(order), self.batch_size):
      rows = order[start : start + self.batch_size]
      ids, mask = pad_prompts(
        [prompts[i] for i in rows], rows=self.batch_size, pad_token=self.sampling.pad_token
      )
      out = generate(self.module, self.params, ids, mask, self.sampling)
      for k, i in enumerate(rows):
        tokens = out.tokens[k, : out.lengths[k]].tolist()
        outputs[i] = self.tokenizer.decode(tokens, skip_special_tokens=True)
    self.last_outputs = outputs
    return outputs
