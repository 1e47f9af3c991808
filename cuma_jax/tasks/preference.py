"""The preference task end to end: data, backbone, chat SFT, DPO, GRPO, evaluation.

``cuma_jax.run`` (and so ``python -m cuma_jax.main``) hands a ``task="preference"`` config
here.  Stages run in the order of
``preference.stages``, each in ``WORKDIR/<stage>`` (resumable like any training run), each
starting from the adapters the previous one left.  Evaluation (docs/evaluation.md#preference-
alignment) scores the base model (the backbone with the adapters off), the trained model and
the ``eval.baselines`` trained the same way: CA 4-way accuracy, win-rate against the base
model's replies as judged by ``preference.eval.judge``, Distinct-n; on the synthetic data
also the reference predictors (each culture's optimum, the population's mode).  Predictions
and verdicts go to ``WORKDIR/predictions/*.jsonl``, metrics to ``WORKDIR/results.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, cast
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from cuma_jax import errors, fingerprint, runtime, schema, sharding
from cuma_jax.data import ca_prompts, chat, preference_builder
from cuma_jax.data.pipeline import as_text
from cuma_jax.data.tokenize import END_OF_TURN, pad_id, render_prompt
from cuma_jax.evaluation import judging, metrics
from cuma_jax.evaluation import preference as evaluation
from cuma_jax.generation import SamplingConfig
from cuma_jax.params import filter_tree, is_adapter_path, merge_params, split_params
from cuma_jax.training import checkpointing, loop
from cuma_jax.training.preference import (
  Reference,
  Rollout,
  dpo_objective,
  grpo_objective,
)
from cuma_jax.training.step import sft_objective
from cuma_jax.training.workdir import WorkdirLock, check_workdir_path, write_atomically


def load_data(config: schema.Config, workdir: str, log=print) -> runtime.Data:
  """Opens the prepared preference dataset of ``config.data`` (prepared once per inputs)."""
  data_dir = config.data.data_dir or os.path.join(workdir, "tfds")
  builder = runtime.process_zero_first(
    "prepare the dataset", lambda: preference_builder.prepared_builder(config.data, data_dir, log)
  )
  sources = dict(builder.as_data_source())
  needed = ["sft_train", "dpo_train", "dpo_test"]
  if config.data.dataset != "prism":  # PRISM has no 4-way accuracy set
    needed.append("ca_eval")
  for split in needed:
    if len(sources.get(split, ())) == 0:
      raise ValueError(
        f"the {config.data.dataset} dataset has no valid rows in split {split!r} (its skip "
        f"counts: {builder.info.metadata.get('skip_counts')}); check config.data.manual_dir "
        "or, for the synthetic data, data.synthetic_preference.num_users"
      )
  oracle = None
  if config.data.dataset == "synthetic_preference":
    oracle = preference_builder.load_oracle(sources["sft_train"])
  return runtime.Data(sources=sources, oracle=oracle, directory=str(builder.data_dir))


@dataclasses.dataclass
class Aligned(runtime.Experiment):
  """A preference run's parts: model, tokenizer, data, demographics (see :func:`prepare`)."""

  # The backbone's own weights, kept apart from ``params`` (whose trained leaves each stage
  # consumes): the frozen arrays themselves, or a copy when every weight is trained.
  backbone: dict = dataclasses.field(init=False)

  def __post_init__(self):
    self.backbone = _backbone_params(self.params, copy=self.config.trainable == "all")

  def lengths(self) -> chat.Lengths:
    p = self.config.preference
    return chat.Lengths(self.config.data.max_length, p.max_prompt_length, p.max_completion_length)

  def table(self, source):
    """[profiles, d] router inputs of a split's sorted distinct profiles (or None)."""
    if self.demographics is None:
      return None
    return self.demographics.encode(chat.profile_table(source))

  def context(self, messages) -> str:
    """What the judge reads as a case's conversation: its turns after the system turn, or
    with ``preference.eval.judge_prompt="released"`` the templated prompt, as the released
    evaluation reads its DPO ``prompt`` column."""
    if self.config.preference.eval.judge_prompt == "released":
      return render_prompt(self.tokenizer, messages)
    return chat.context_of(messages)

  def model(self, name: str, params) -> evaluation.Model:
    encode = None if self.demographics is None else self.demographics.encode
    return evaluation.Model(name, self.module, params, encode)

  def base(self) -> evaluation.Model:
    """The backbone with the adapters off (frozen weights, no profile reaches a router)."""
    return evaluation.Model("base", self.module.clone(adapter=None), self.backbone)

  @functools.cached_property
  def judge(self):
    """``preference.eval.judge``, loaded once for GRPO's rewards and the win-rate."""
    pe = self.config.preference.eval
    if pe.judge == "rule":
      return evaluation.RuleJudge(self.data.oracle)
    demonstrations = []
    if pe.judge_demonstrations:
      cases = _cases(
        self.data.sources["dpo_train"], pe.judge_demonstrations, self.context, replies=True
      )
      demonstrations = [
        judging.Case(c["profile"], c["context"], c["chosen"], c["rejected"]) for c in cases
      ]
    judge = judging.LocalLMJudge(pe.judge_checkpoint, demonstrations=demonstrations)
    return judge.with_prompt(judging.USER_PROMPTS[pe.judge_prompt])

  def sampling(self, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0):
    """How this backbone's replies are decoded: stopped at its end-of-turn tokens."""
    return SamplingConfig(
      max_new_tokens=max_new_tokens,
      temperature=temperature,
      top_p=top_p,
      stop_tokens=judging.end_of_turn_ids(self.tokenizer, self.backbone_dir),
      pad_token=pad_id(self.tokenizer),
    )


def _backbone_params(params: dict, copy: bool) -> dict:
  """The backbone's own parameters (adapters and prefixes left out), copied if ``copy``."""
  backbone = filter_tree(params, lambda path: not is_adapter_path(path))
  return jax.tree.map(jnp.copy, backbone) if copy else backbone


def prepare(
  config: schema.Config, workdir: str, log=print, *, encoders: runtime.FittedEncoders | None = None
) -> Aligned:
  """Prepares data, backbone, model, tokenizer and demographics of a validated config, after
  refusing a workdir whose stages' checkpoints came from another config."""
  # runtime.prepare builds the task's experiment_type, Aligned.
  return cast(Aligned, runtime.prepare(config, workdir, TASK, log, encoders))


def _checkpoint_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage, "checkpoints")


# Each stage's own config keys: a stage's checkpoint ignores changes to the others'.
_STAGE_KEYS = {"dpo": "preference.dpo.", "grpo": "preference.grpo."}


def _conflicts(stage: str):
  """The resume check of ``stage``'s checkpoints: the schema's, less the other stages' keys."""
  others = tuple(prefix for name, prefix in _STAGE_KEYS.items() if name != stage)

  def conflicts(saved: dict, current: dict) -> list[str]:
    return [c for c in schema.resume_conflicts(saved, current) if not c.startswith(others)]

  return conflicts


def _stage_inputs(aligned: Aligned, previous: str | None) -> dict:
  """The run's inputs plus, after the first stage, the previous stage's last checkpoint: a
  stage trained on from another start is refused, not silently kept."""
  if previous is None:
    return aligned.inputs
  directory = _checkpoint_dir(aligned.workdir, previous)
  step = checkpointing.check_workdir(
    aligned.config, directory, config_conflicts=_conflicts(previous)
  )
  last = fingerprint.fingerprint(os.path.join(directory, str(step)))
  return {**aligned.inputs, "previous_stage": last}


def _stage(aligned: Aligned, stage: str, previous: str | None, params: dict, log) -> dict:
  """Trains one stage from ``params`` (what ``previous`` left); returns its parameters."""
  config, sources = aligned.config, aligned.data.sources
  p = config.preference
  overrides: dict[str, Any] = {}
  lengths = aligned.lengths()
  if stage == "sft":
    objective = sft_objective(
      aligned.module,
      lambda_aux=config.optim.lambda_aux,
      label_smoothing=config.optim.label_smoothing,
      max_targets=p.max_completion_length,
    )
    source, kind, batch_size = sources["sft_train"], "sft", config.data.batch_size
    steps = loop.total_steps(config, len(source))
  elif stage == "dpo":
    reference = _reference(aligned, params, p.dpo.reference)
    objective = dpo_objective(
      aligned.module,
      reference,
      beta=p.dpo.beta,
      lambda_aux=p.dpo.lambda_aux,
      max_targets=p.max_completion_length,
    )
    source, kind = sources["dpo_train"], "dpo"
    batch_size = p.dpo.batch_size or config.data.batch_size
    steps = loop.total_steps(
      config, len(source), num_steps=p.dpo.num_steps, num_epochs=1, batch_size=batch_size
    )
    overrides = _stage_optim(p.dpo)
  else:
    objective = _grpo(aligned, params)
    source, kind = sources["dpo_train"], "prompt"
    batch_size = p.grpo.prompts_per_step or config.data.batch_size
    steps = p.grpo.num_steps
    overrides = _stage_optim(p.grpo)
    # Prompts only: sampling appends at most max_new_tokens to each.
    lengths = chat.Lengths(
      p.grpo.max_prompt_length + p.grpo.max_new_tokens,
      p.grpo.max_prompt_length,
      p.grpo.max_new_tokens,
    )
  dataset = chat.make_chat_dataset(
    kind,
    source,
    aligned.tokenizer,
    lengths,
    batch_size=batch_size,
    # DPO scores the reply and its end-of-turn token, whatever SFT supervises.
    supervision=config.data.supervision if kind == "sft" else END_OF_TURN,
    truncation=p.sft_truncation if kind == "sft" else "prompt_start",
    seed=config.data.shuffle_seed,
    num_epochs=None,
  )
  log(f"{stage}: {steps} steps of {batch_size} {'prompts' if kind == 'prompt' else 'rows'}")
  result = loop.train(
    config,
    os.path.join(aligned.workdir, stage),
    aligned.module,
    params,
    dataset,
    num_steps=steps,
    demographic_table=aligned.table(source),
    inputs=_stage_inputs(aligned, previous),
    config_conflicts=_conflicts(stage),
    objective=objective,
    optim_overrides=overrides,
    log=log,
  )
  return merge_params(result.trainable, result.frozen)


def _stage_optim(section) -> dict:
  keys = ("learning_rate", "schedule", "warmup_steps", "weight_decay")
  return {**{k: getattr(section, k) for k in keys}, "horizon_steps": 0}


def _reference(aligned: Aligned, params: dict, kind: str) -> Reference:
  """The DPO/GRPO reference: the adapters-off backbone (read inside the step from the
  frozen weights; with every weight trained, the copy kept at load), or the policy as the
  stage starts (``"sft"``: a copy of the trained part over the frozen backbone)."""
  config = aligned.config
  if kind == "sft":
    trainable, _ = split_params(params, config.trainable, trainable_dtype=None)
    return Reference(aligned.module, jax.tree.map(jnp.copy, trainable))
  if config.trainable == "all":
    return Reference(aligned.module.clone(adapter=None), aligned.backbone)
  return Reference(aligned.module.clone(adapter=None))


def _grpo(aligned: Aligned, params: dict):
  config = aligned.config
  g = config.preference.grpo
  source = aligned.data.sources["dpo_train"]
  judge = aligned.judge
  if isinstance(judge, judging.LocalLMJudge):
    judge = judge.with_prompt(judging.reward_user_prompt)
  references: dict[int, str] = {}
  base = aligned.base()
  tokenizer = aligned.tokenizer

  def reference_replies(indices: np.ndarray) -> list[str]:
    """Each prompt's reference reply (computed once per prompt)."""
    missing = sorted({int(i) for i in indices} - set(references))
    if missing:
      records = source.__getitems__(missing)
      if g.reference_reply == "chosen":
        replies = [as_text(r["chosen"]) for r in records]
      elif g.reference_reply == "population_mode":
        oracle = aligned.data.oracle
        questions = [chat.messages_of(r)[-1]["content"] for r in records]
        replies = [oracle.reply(q, oracle.population_reply(q)) for q in questions]
      else:
        replies = evaluation.generate_replies(
          base,
          tokenizer,
          [chat.messages_of(r) for r in records],
          [as_text(r["profile"]) for r in records],
          aligned.sampling(g.max_new_tokens),
          rng=jax.random.key(config.seed),
          max_prompt_length=g.max_prompt_length,
          batch_size=config.eval.batch_size,
        )
      references.update(zip(missing, replies, strict=True))
    return [references[int(i)] for i in indices]

  def reward(indices: np.ndarray, texts: list[str]) -> np.ndarray:
    records = source.__getitems__([int(i) for i in indices])
    cases = [
      judging.Case(as_text(r["profile"]), aligned.context(chat.messages_of(r)), reference, text)
      for r, reference, text in zip(records, reference_replies(indices), texts, strict=True)
    ]
    return np.asarray(judging.rewards(judge, cases), np.float32)

  sampling = aligned.sampling(g.max_new_tokens, g.temperature, g.top_p)
  return grpo_objective(
    aligned.module,
    Rollout(
      tokenizer=tokenizer,
      sampling=sampling,
      group_size=g.group_size,
      reward=reward,
      layout=sharding.Layout.of(config.mesh),
    ),
    clip_epsilon=g.clip_epsilon,
    loss_type=g.loss_type,
    kl_beta=g.kl_beta,
    reference=_reference(aligned, params, "base"),
    lambda_aux=g.lambda_aux,
  )


def _cases(source, count: int, context, *, replies: bool = False) -> list[dict]:
  """Distinct prompts (one per conversation turn) of a DPO split, in split order, each with
  its ``context(messages)``; ``count`` 0 means all (records are read until ``count`` are
  found)."""
  seen, cases = set(), []
  for index in range(len(source)):
    r = source[index]
    key = (as_text(r["conversation_id"]), int(r["turn"]))
    if key in seen:
      continue
    seen.add(key)
    messages = chat.messages_of(r)
    case = {
      "id": as_text(r["id"]),
      "profile": as_text(r["profile"]),
      "context": context(messages),
      "messages": messages,
    }
    if replies:
      case.update(chosen=as_text(r["chosen"]), rejected=as_text(r["rejected"]))
    cases.append(case)
    if count and len(cases) == count:
      break
  return cases


@dataclasses.dataclass
class Evaluation:
  """What every model is scored on: the CA rows, the judged prompts, the base's replies."""

  ca_rows: list[dict]
  cases: list[dict]
  base_replies: list[str]
  judge: Any


def _ca_rows(source, count: int) -> list[dict]:
  if source is None:
    return []
  records = source.__getitems__(range(min(len(source), count) if count else len(source)))
  return [
    {
      "id": as_text(r["id"]),
      "profile": as_text(r["profile"]),
      "question": as_text(r["question"]),
      "options": [as_text(o) for o in r["options"]],
      "answer": int(r["answer"]),
    }
    for r in records
  ]


def reply_key(seed: int, name: str):
  """The sampling key of model ``name``'s replies: the base's is ``key(seed + 1)``, every
  other model folds its name into it. Sampled with the base's own key, a model close to the
  base would repeat its replies token for token, a tie (so a loss) that says nothing; the
  released evaluation samples each model independently."""
  key = jax.random.key(seed + 1)
  return key if name == "base" else jax.random.fold_in(key, zlib.crc32(name.encode()) % 2**31)


def _replies(aligned: Aligned, model: evaluation.Model, cases: list[dict]) -> list[str]:
  pe = aligned.config.preference.eval
  return evaluation.generate_replies(
    model,
    aligned.tokenizer,
    [c["messages"] for c in cases],
    [c["profile"] for c in cases],
    aligned.sampling(pe.max_new_tokens, pe.temperature, pe.top_p),
    rng=reply_key(aligned.config.seed, model.name),
    max_prompt_length=aligned.config.preference.max_prompt_length,
    batch_size=aligned.config.eval.batch_size,
    layout=sharding.Layout.of(aligned.config.mesh),
  )


def evaluation_set(aligned: Aligned, log=print) -> Evaluation:
  pe = aligned.config.preference.eval
  sources = aligned.data.sources
  ca_rows = _ca_rows(sources.get("ca_eval"), pe.ca_rows)
  if pe.ca_mode == "few_shot" and pe.ca_shots >= len(ca_rows):
    raise ValueError(
      f"config.preference.eval.ca_shots={pe.ca_shots} few-shot rows need more than the "
      f"{len(ca_rows)} accuracy rows (preference.eval.ca_rows={pe.ca_rows})"
    )
  cases = _cases(sources["dpo_test"], pe.win_rate_prompts, aligned.context)
  log(f"evaluation: {len(cases)} judged prompts; the base model replies")
  return Evaluation(
    ca_rows=ca_rows,
    cases=cases,
    base_replies=_replies(aligned, aligned.base(), cases),
    judge=aligned.judge,
  )


def score(
  aligned: Aligned, model: evaluation.Model, ev: Evaluation, predictions: str | None = None
) -> dict:
  """CA accuracy, win-rate against the base, Distinct-n; writes the model's JSONL files to
  ``predictions`` (default ``WORKDIR/predictions``)."""
  pe = aligned.config.preference.eval
  results: dict[str, Any] = {}
  files: dict[str, list[dict]] = {}
  if ev.ca_rows:
    results["ca"], files["ca"] = evaluation.ca_accuracy(
      model,
      aligned.tokenizer,
      ev.ca_rows,
      mode=pe.ca_mode,
      shots=pe.ca_shots,
      max_length=aligned.config.data.max_length,
      batch_size=aligned.config.eval.batch_size,
    )
  replies = ev.base_replies if model.name == "base" else _replies(aligned, model, ev.cases)
  if model.name != "base":
    results["win_rate"], files["win_rate"] = evaluation.win_rate(
      ev.judge, ev.cases, replies, ev.base_replies, seed=pe.swap_seed
    )
  results.update(evaluation.distinct(replies))
  if jax.process_index() == 0:
    directory = predictions or os.path.join(aligned.workdir, "predictions")
    os.makedirs(directory, exist_ok=True)
    for kind, records in files.items():
      write_atomically(
        os.path.join(directory, f"{model.name}_{kind}.jsonl"),
        "".join(json.dumps(r) + "\n" for r in records),
      )
  return results


def references(aligned: Aligned, ev: Evaluation) -> dict:
  """The synthetic data's reference predictors: each culture's optimum and the population's
  mode, as CA answers and as replies judged against the base's."""
  oracle = aligned.data.oracle
  out = {}
  for name in ("optimum", "population_mode"):

    def option(profile: str, question: str, name: str = name) -> int:
      if name == "optimum":
        return int(np.argmax(oracle.distribution(profile, question)))
      return oracle.population_reply(question)

    result = {}
    if ev.ca_rows:
      predicted = [option(r["profile"], r["question"]) for r in ev.ca_rows]
      answers = [r["answer"] for r in ev.ca_rows]
      result["ca"] = {
        "accuracy": metrics.accuracy(predicted, answers),
        "macro_f1": metrics.macro_f1(predicted, answers),
        "rows": len(answers),
      }
    questions = [c["messages"][-1]["content"] for c in ev.cases]
    replies = [
      oracle.reply(q, option(c["profile"], q)) for c, q in zip(ev.cases, questions, strict=True)
    ]
    result["win_rate"], _ = evaluation.win_rate(
      ev.judge, ev.cases, replies, ev.base_replies, seed=aligned.config.preference.eval.swap_seed
    )
    out[name] = result
  return out


def run(
  config: schema.ConfigLike,
  workdir: str,
  log=print,
  *,
  encoders: runtime.FittedEncoders | None = None,
):
  """Trains the stages (``mode='train'``) or restores the last (``'eval'``), evaluates,
  writes results.json; returns the results. ``encoders``: fitted demographic encoders to
  reuse (the run's baselines share them)."""
  config = runtime.validate(config, TASK)
  pe = config.preference.eval
  host_side = _host_side_stages(config)
  if jax.process_count() > 1 and host_side:
    raise ValueError(
      f"{host_side} run on one process's batch on the host (sampling, or a "
      "fixed reference); run them single-process (one host, any number of its devices)"
    )
  if pe.judge == "local_lm" and not os.path.isdir(pe.judge_checkpoint):
    raise errors.MissingInput(
      f"config.preference.eval.judge_checkpoint={pe.judge_checkpoint!r} is not a directory; "
      "judge='local_lm' needs a local Hugging Face causal LM there"
    )
  check_workdir_path(workdir)
  last = config.preference.stages[-1]
  step = checkpointing.check_workdir(
    config, _checkpoint_dir(workdir, last), config_conflicts=_conflicts(last)
  )
  if step is None and config.mode == "eval":
    raise errors.MissingInput(
      f"mode=eval needs a readable checkpoint of the last stage in {_checkpoint_dir(workdir, last)}"
    )
  encoders = encoders or runtime.FittedEncoders()
  with WorkdirLock(workdir, enabled=jax.process_index() == 0, log=log):
    aligned = prepare(config, workdir, log, encoders=encoders)
    params, exports = _train_or_restore(aligned, log)
    ev = evaluation_set(aligned, log)
    results = {"base": score(aligned, aligned.base(), ev)}
    report("base", results["base"], log)
    results["trained"] = score(aligned, aligned.model(config.method, params), ev)
    report(config.method, results["trained"], log)
    if aligned.data.oracle is not None:
      results["references"] = references(aligned, ev)
      for name, r in results["references"].items():
        report(name, r, log)
    for method in config.eval.baselines:
      results.setdefault("baselines", {})[method] = _baseline(aligned, method, ev, encoders, log)
    runtime.write_results(config, workdir, results, exports, log)
  return results


def _host_side_stages(config: schema.Config) -> list[str]:
  """The stages whose batches are prepared on the host with the model (GRPO's sampling; a
  DPO reference other than the frozen backbone)."""
  stages = config.preference.stages
  dpo_fixed = config.preference.dpo.reference == "sft" or config.trainable == "all"
  return [s for s in stages if s == "grpo" or (s == "dpo" and dpo_fixed)]


def _train_or_restore(aligned: Aligned, log) -> tuple[dict, dict]:
  """The last stage's parameters, and the digests of their export (written or verified)."""
  params = aligned.params
  if aligned.config.mode == "eval":
    params = _restored(aligned, aligned.config.preference.stages[-1], log)
  else:
    previous = None
    for stage in aligned.config.preference.stages:
      params = _stage(aligned, stage, previous, params, log)
      previous = stage
  return params, runtime.export(aligned.config, aligned.workdir, params, log)


def _restored(aligned: Aligned, stage: str, log) -> dict:
  stages = aligned.config.preference.stages
  previous = stages[stages.index(stage) - 1] if stages.index(stage) else None
  directory = _checkpoint_dir(aligned.workdir, stage)
  params = runtime.trained_params(
    aligned,
    directory,
    inputs=_stage_inputs(aligned, previous),
    conflicts=_conflicts(stage),
    log=log,
  )
  if params is None:
    raise errors.MissingInput(f"{directory} has no checkpoint of stage {stage} to evaluate")
  return params


def restore(
  workdir: str,
  config: schema.ConfigLike,
  log=print,
  *,
  encoders: runtime.FittedEncoders | None = None,
) -> Aligned:
  """The trained run of ``workdir`` with ``config``: its parts, and the last stage's
  parameters as ``params``."""
  last = config.preference.stages[-1]
  if not runtime.has_checkpoint(_checkpoint_dir(workdir, last)):
    raise errors.MissingInput(
      f"{workdir} has no training checkpoint of its last stage in {_checkpoint_dir(workdir, last)}"
    )
  config = runtime.validate(config, TASK)
  aligned = prepare(config, workdir, log, encoders=encoders)
  aligned.params = _restored(aligned, last, log)
  return aligned


def _baseline(aligned: Aligned, method: str, ev: Evaluation, encoders, log) -> dict:
  """``method`` trained through the same stages on the same data and backbone, scored on
  the same evaluation set (the base's replies are shared)."""
  baseline, workdir = runtime.baseline_of(aligned, method)
  log(f"baseline {method}: the same data, backbone and stages, in {workdir}")
  with WorkdirLock(workdir, enabled=jax.process_index() == 0, log=log):
    other = prepare(baseline, workdir, log, encoders=encoders)
    other.judge = aligned.judge  # one judge for every model of the run
    params, exports = _train_or_restore(other, log)
    runtime.write_results(baseline, workdir, {}, exports, log)
    # Beside the run's own predictions, so that one folder compares every model.
    result = score(
      other, other.model(method, params), ev, os.path.join(aligned.workdir, "predictions")
    )
  report(method, result, log)
  return result


def report(name: str, result: dict, log) -> None:
  parts = []
  if "ca" in result:
    parts.append(f"CA accuracy {result['ca']['accuracy']:.4f}")
  if "win_rate" in result:
    w = result["win_rate"]
    parts.append(f"win-rate vs base {w['win_rate']:.4f} ({w['wins']}W/{w['ties']}T/{w['losses']}L)")
  if "distinct_1" in result:
    parts.append(f"distinct-1 {result['distinct_1']:.3f}  distinct-2 {result['distinct_2']:.3f}")
  log(f"[preference] {name:>16}: " + "  ".join(parts))


def _check_checkpoints(config: schema.Config, workdir: str, inputs: dict) -> None:
  """Each stage's checkpoints are of this config (their inputs are checked as each stage
  resumes: a later stage's include the previous stage's last checkpoint)."""
  del inputs
  for stage in config.preference.stages:
    checkpointing.check_workdir(
      config, _checkpoint_dir(workdir, stage), config_conflicts=_conflicts(stage)
    )


def _batch_rows(config: schema.Config) -> list[tuple[str, int]]:
  p = config.preference
  pairs = (p.dpo.batch_size or config.data.batch_size) * jax.process_count()
  samples = (p.grpo.prompts_per_step or config.data.batch_size) * p.grpo.group_size
  return [("DPO pairs per step", pairs), ("GRPO samples per step", samples)]


def _answers(train_source) -> list[tuple[str, str, int]]:
  """The synthetic preference rows know their option (the others have -1)."""
  records = train_source.__getitems__(range(len(train_source)))
  return [
    (as_text(r["profile"]), as_text(r["question_id"]), int(r["chosen_option"]))
    for r in records
    if int(r["chosen_option"]) >= 0
  ]


def _warmup_corpus(data: runtime.Data):
  """Every text of the training conversations and the 4-way choice prompts."""
  train = data.sources["sft_train"]
  for record in train.__getitems__(range(len(train))):
    for message in chat.messages_of(record):
      yield message["content"]
  yield ca_prompts.VANILLA_SYSTEM_PROMPT
  yield ca_prompts.PERSONA_SYSTEM_PROMPT


def _warmup_batches(warm: schema.Config, data: runtime.Data, tokenizer, module):
  """The chat SFT rows, each shown under ANOTHER user's profile: the backbone learns the chat
  format and that a profile is there, but not what it implies (the population's preferred
  replies)."""
  p = warm.preference
  dataset = chat.make_chat_dataset(
    "sft",
    data.sources["sft_train"],
    tokenizer,
    chat.Lengths(warm.data.max_length, p.max_prompt_length, p.max_completion_length),
    batch_size=warm.data.batch_size,
    profile_blind=True,
    seed=warm.data.shuffle_seed,
    num_epochs=None,
  )
  objective = sft_objective(
    module, lambda_aux=0.0, label_smoothing=0.0, max_targets=p.max_completion_length
  )
  return dataset, objective


class Preference(runtime.Task):
  """``task="preference"``: chat SFT, DPO, GRPO, scored by CA accuracy and judged win-rate."""

  experiment_type = Aligned
  train_split = "sft_train"
  load_data = staticmethod(load_data)
  check_checkpoints = staticmethod(_check_checkpoints)
  batch_rows = staticmethod(_batch_rows)
  profiles = staticmethod(chat.profile_table)
  answers = staticmethod(_answers)
  warmup_corpus = staticmethod(_warmup_corpus)
  warmup_batches = staticmethod(_warmup_batches)
  run = staticmethod(run)
  restore = staticmethod(restore)

  @staticmethod
  def warmup_description(warm: schema.Config) -> str:
    return "on the chat SFT rows, each under another user's profile"

  @staticmethod
  def checkpoint_dirs(workdir: str) -> tuple[str, ...]:
    return tuple(_checkpoint_dir(workdir, stage) for stage in reversed(schema.STAGES))


TASK = Preference()
