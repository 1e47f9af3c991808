"""Preference-alignment evaluation (docs/evaluation.md#preference-alignment): Community
Alignment 4-way accuracy, generation of replies, and the judged win-rate against the base
model, plus the rule-based judge of the synthetic preference data.

Accuracy reads the logits at each row's TRUE last prompt token (right padding, so the
index is the row's length - 1), whatever padding the batch has.  Win-rate: every case is
shown to the judge in an order drawn from a seeded PRNG (``judging.position_swaps``), and a
tie counts as a loss.  Every prediction and verdict is returned as a record for JSONL.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cuma_jax import generation
from cuma_jax.data.ca_prompts import ca_messages, few_shot_rows, letter_token_ids
from cuma_jax.data.chat import strip_think
from cuma_jax.data.synthetic_preference import PreferenceOracle
from cuma_jax.data.tokenize import pad_id, render_prompt
from cuma_jax.evaluation import judging, metrics
from cuma_jax.evaluation.predict import refuse_nonfinite


class RuleJudge:
  """Judges a synthetic case by the user's culture: each reply scores p_c(its option) (a
  reply naming no option scores 0); the higher score wins by more than ``margin``, else tie.
  The question is the oracle's question the context ends with."""

  def __init__(self, oracle: PreferenceOracle, margin: float = 0.05):
    self.oracle, self.margin = oracle, margin
    self.last_outputs: list[str] = []

  def question(self, context: str) -> str:
    matches = [q for q in self.oracle.questions if context.rstrip().endswith(q)]
    if not matches:
      raise ValueError(f"the context {context[-80:]!r} ends with no synthetic question")
    return max(matches, key=len)

  def score(self, profile: str, context: str, reply: str) -> float:
    question = self.question(context)
    option = self.oracle.reply_option(question, reply)
    return 0.0 if option is None else float(self.oracle.distribution(profile, question)[option])

  def __call__(self, cases: Sequence[judging.Case]) -> list[str]:
    verdicts, self.last_outputs = [], []
    for case in cases:
      a = self.score(case.profile, case.context, case.response_a)
      b = self.score(case.profile, case.context, case.response_b)
      verdicts.append("A" if a > b + self.margin else "B" if b > a + self.margin else "tie")
      self.last_outputs.append(f"score A {a:.3f}, score B {b:.3f}")
    return verdicts


def _encoded(tokenizer, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], int]:
  """Each text's ids, a longer one keeping its last ``max_length``; and how many were cut."""
  encoded = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
  return [e[-max_length:] for e in encoded], sum(len(e) > max_length for e in encoded)


def _batches(n: int, size: int):
  for start in range(0, n, size):
    yield slice(start, min(start + size, n))


@functools.lru_cache(maxsize=8)
def _letter_scorer(module):
  """(params, ids, mask, z, letter ids) -> [N, 4] logits of the letters at the last token."""

  @jax.jit
  def scorer(params, ids, mask, demographics, letters):
    last = (mask.sum(1) - 1)[:, None]
    out = module.apply(
      {"params": params},
      ids,
      attention_mask=mask,
      demographics=demographics,
      logit_indices=last,
    )
    logits = out[0] if isinstance(out, tuple) else out
    return jnp.take(logits[:, 0], letters, axis=-1)

  return scorer


@dataclasses.dataclass(frozen=True)
class Model:
  """A model to evaluate: decoder, parameters, and the demographic vectors of profiles
  (``demographics(profiles) -> [N, d]`` or None when its routers read none)."""

  name: str
  module: Any
  params: Any
  demographics: Callable[[Sequence[str]], Any] | None = None

  def z(self, profiles: Sequence[str]):
    return None if self.demographics is None else jnp.asarray(self.demographics(profiles))


def ca_accuracy(
  model: Model,
  tokenizer,
  rows: Sequence[dict],
  *,
  mode: str = "persona",
  shots: int = 3,
  max_length: int = 2048,
  batch_size: int = 16,
) -> tuple[dict[str, float], list[dict]]:
  """Accuracy and macro-F1 of the preferred letter over ``rows`` (CA records), and one
  prediction record per row."""
  letters = jnp.asarray(letter_token_ids(tokenizer))
  prompts = [
    render_prompt(
      tokenizer,
      ca_messages(row, mode, shots=few_shot_rows(rows, i, shots) if mode == "few_shot" else ()),
    )
    for i, row in enumerate(rows)
  ]
  scorer = _letter_scorer(model.module)
  encoded, truncated = _encoded(tokenizer, prompts, max_length)
  predictions, nonfinite = [], 0
  for batch in _batches(len(rows), batch_size):
    ids, mask = generation.pad_prompts(encoded[batch], rows=batch_size, pad_token=pad_id(tokenizer))
    profiles = [r["profile"] for r in rows[batch]]
    z = model.z(profiles + profiles[:1] * (batch_size - len(profiles)))
    scores = np.asarray(scorer(model.params, ids, mask, z, letters))[: len(profiles)]
    nonfinite += int((~np.isfinite(scores)).any(-1).sum())
    predictions.extend(scores.argmax(-1).tolist())
  refuse_nonfinite(nonfinite, len(rows), f"split 'ca_eval' scored by {model.name}")
  answers = [int(r["answer"]) for r in rows]
  records = [
    {"id": r["id"], "model": model.name, "mode": mode, "predicted": p, "answer": a}
    for r, p, a in zip(rows, predictions, answers, strict=True)
  ]
  return {
    "accuracy": metrics.accuracy(predictions, answers),
    "macro_f1": metrics.macro_f1(predictions, answers),
    "rows": len(rows),
    "truncated_prompts": truncated,
  }, records


def generate_replies(
  model: Model,
  tokenizer,
  prompts: Sequence[list[dict]],
  profiles: Sequence[str],
  sampling: generation.SamplingConfig,
  *,
  rng,
  max_prompt_length: int,
  batch_size: int = 16,
  layout=None,
) -> list[str]:
  """One reply per chat prompt (think and tool blocks stripped), the profile's z at every
  step; a prompt longer than ``max_prompt_length`` keeps its end."""
  encoded, _ = _encoded(
    tokenizer, [render_prompt(tokenizer, p) for p in prompts], max_prompt_length
  )
  replies = []
  for i, batch in enumerate(_batches(len(encoded), batch_size)):
    ids, mask = generation.pad_prompts(
      encoded[batch], rows=batch_size, pad_token=sampling.pad_token
    )
    rows = list(profiles[batch])
    out = generation.generate(
      model.module,
      model.params,
      ids,
      mask,
      sampling,
      demographics=model.z(rows + rows[:1] * (batch_size - len(rows))),
      rng=jax.random.fold_in(rng, i),
      layout=layout,
    )
    for tokens, length in zip(out.tokens[: len(rows)], out.lengths[: len(rows)], strict=True):
      replies.append(strip_think(tokenizer.decode(tokens[:length], skip_special_tokens=True)))
  return replies


def win_rate(
  judge: judging.Judge,
  cases: Sequence[dict],
  model_replies: Sequence[str],
  base_replies: Sequence[str],
  *,
  seed: int,
) -> tuple[dict[str, float], list[dict]]:
  """The model's win-rate against the base over ``cases`` ({id, profile, context}), each
  shown in a seeded order; returns the tally and one verdict record per case."""
  swaps = judging.position_swaps(len(cases), seed)
  shown = [
    judging.arrange(c["profile"], c["context"], m, b, bool(s))
    for c, m, b, s in zip(cases, model_replies, base_replies, swaps, strict=True)
  ]
  verdicts = judge(shown)
  outcomes = [judging.model_outcome(v, bool(s)) for v, s in zip(verdicts, swaps, strict=True)]
  raw = getattr(judge, "last_outputs", None) or [""] * len(cases)
  records = [
    {
      "id": c["id"],
      "profile": c["profile"],
      "context": c["context"],
      "model_reply": m,
      "base_reply": b,
      "swapped": bool(s),
      "judge_output": r,
      "verdict": v,
      "outcome": o,
    }
    for c, m, b, s, r, v, o in zip(
      cases, model_replies, base_replies, swaps, raw, verdicts, outcomes, strict=True
    )
  ]
  return judging.win_rate(outcomes), records


def distinct(replies: Sequence[str]) -> dict[str, float]:
  """Distinct-1 and distinct-2 of the replies (corpus level)."""
  return {f"distinct_{n}": metrics.distinct_n(replies, n) for n in (1, 2)}
