"""The paper's methods and scales as presets: scales are functions, methods and ablations tables.

``configs/<experiment>.py`` files are thin ``get_config(preset)`` wrappers around
:func:`experiment_config`, so notebooks build the same configs without absl.  A config is
the schema's defaults (``cuma_jax.schema``) overridden by the scale, then the method's
table, then the ablation's; it is locked (an unknown ``--config.x=...`` is refused) and
validated before anything is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ml_collections

from cuma_jax import schema
from cuma_jax.layers.adapter_config import TARGET_MODULES

DEFAULT_PRESET = "demo"

Overrides = dict[str, Any]


def _section(c: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str]:
  """The section holding dotted ``key``, and the key's name in it."""
  *path, name = key.split(".")
  for part in path:
    c = c[part]
  if name not in c:
    raise KeyError(f"preset override {key!r} is not a config key")
  return c, name


def _get(c: ml_collections.ConfigDict, key: str) -> Any:
  section, name = _section(c, key)
  return section[name]


def apply_overrides(
  c: ml_collections.ConfigDict, overrides: Overrides
) -> ml_collections.ConfigDict:
  """Sets each dotted key of ``overrides`` in ``c``; a key ``c`` does not have is refused,
  but for a variant's parameter (``adapter.router_kwargs.NAME``, checked by validation).
  A changed ``adapter.router`` or ``adapter.gate`` drops the old variant's parameters
  (unless ``overrides`` sets the new one's)."""
  kwargs_of = {name: section for section, name in schema.VARIANT_KWARGS.items()}
  for key, value in overrides.items():
    variant = schema.variant_section(key)
    if variant and key != variant:
      holder, name = _section(c, variant)
      holder[name] = {**holder[name].to_dict(), key[len(variant) + 1 :]: value}
      continue
    section, name = _section(c, key)
    dropped = key in kwargs_of and section[name] != value
    section[name] = value
    if dropped and not any(schema.variant_section(k) == kwargs_of[key] for k in overrides):
      holder, name = _section(c, kwargs_of[key])
      holder[name] = {}
  return c


def with_overrides(config: schema.Config, overrides: Overrides) -> schema.Config:
  """``config`` with each dotted key of ``overrides`` set (as :func:`apply_overrides`),
  validated again: how a typed config is changed."""
  return schema.validate(
    apply_overrides(ml_collections.ConfigDict(schema.as_dict(config)), overrides)
  )


def _paper_scale(architecture: str, rank: int, learning_rate: float, **extra) -> Callable:
  """A recipe of the paper's section 7: CuMA on an 8B backbone, WorldValuesBench."""

  def scale() -> ml_collections.ConfigDict:
    return apply_overrides(
      schema.defaults(),
      {
        "model.architecture": architecture,
        "adapter.rank": rank,
        "adapter.alpha": 2.0 * rank,
        "optim.learning_rate": learning_rate,
        # The plan (python -m cuma_jax.plan, docs/sharding.md): on v5e-8 (8 chips of 16 GiB)
        # the train step needs 5.01 GiB per chip under FSDP, 5.60 under tensor parallelism,
        # and with replicated weights it does not fit; FSDP's weight traffic overlaps compute.
        "mesh.rules_preset": "fsdp",
        **extra,
      },
    )

  return scale


# The embedded defaults' model: the tiny Qwen3 in float32 on a CPU, CuMA with 4 experts on
# every projection, z from the n-gram encoder fitted to the training answers (the tiny
# backbone's pooled states carry too little of a profile).
_TINY_CUMA: Overrides = {
  "model.architecture": schema.TINY,
  "model.dtype": "float32",
  "model.param_dtype": "float32",
  "model.scan_layers": False,
  "model.remat": "none",
  "encoder.kind": "fitted_ngrams",
  "adapter.targets": TARGET_MODULES,
  "adapter.num_experts": 4,
  "adapter.router_hidden": (32,),
  "tiny_backbone.hidden_size": 64,
}


def demo() -> ml_collections.ConfigDict:
  """The embedded default: the synthetic survey and a tiny Qwen3 built locally, on a CPU.

  Every method reads the profile as text in the system prompt (CuMA's routers read it as z
  too), on a backbone warmed up to read profiles but never shown a culture's answers. The
  baselines get CuMA's data, steps and trainable-parameter budget (LoRA's rank matched by
  cuma_jax.param_count); each method's learning rate was chosen on the validation split
  (experiments/demo/sweep.md); the steps are set by the demo's 10-minute budget and the
  encoder width is the earlier demo's, not re-chosen.

  Expected (test split, experiments/demo/results.md): CuMA accuracy 0.3503 and EMD 0.1405,
  the LoRA baseline 0.2128 and 0.2285.
  """
  return apply_overrides(
    schema.defaults(),
    {
      **_TINY_CUMA,
      "adapter.demographic_dim": 64,
      "tiny_backbone.warmup": "profile_reading",
      # Half of the warm-up's examples are profile questions: 300 steps of them alone brought
      # held-out profile questions from chance (0.18) to 0.30 only (docs/data.md).
      "tiny_backbone.warmup_steps": 400,
      "data.dataset": "synthetic",
      "data.max_length": 176,  # the survey's longest example with its profile has 172 tokens
      "data.batch_size": 32,
      "data.demographic_system_prompt": True,
      # Sharp, culture-specific answers: the optimum beats the population mode by 0.69
      # vs 0.27 accuracy (0.78 nats of cross-entropy per answer).
      "data.synthetic.answer_width": 0.3,
      "data.synthetic.country_strength": 5.0,
      "optim.learning_rate": 3e-3,
      "optim.schedule": "cosine",
      "optim.warmup_steps": 10,
      "train.num_steps": 500,
      "train.checkpoint_every": 250,
      "train.keep_checkpoints": 2,
      "eval.batch_size": 128,
      "eval.splits": ("test", "zero_shot"),
      "eval.baselines": ("lora",),
      "eval.lora_baseline_rank": 64,  # 131,072 trainable parameters against CuMA's 129,272
      "eval.baseline_learning_rates": (("lora", 3e-3),),
      # The untrained base (--config.eval.untrained=True) is mean-collapsed; it costs time.
      "eval.untrained": False,
    },
  )


def tiny() -> ml_collections.ConfigDict:
  """The demo shrunk to seconds: CI's smoke test of the whole job."""
  return apply_overrides(
    demo(),
    {
      "adapter.demographic_dim": 8,  # within what 60 profiles x 6 questions can fit
      "tiny_backbone.hidden_size": 32,
      "tiny_backbone.warmup_steps": 4,
      "tiny_backbone.warmup_batch_size": 8,
      "data.batch_size": 8,
      "data.synthetic.num_countries": 4,
      "data.synthetic.num_questions": 6,
      "data.synthetic.num_train": 60,
      "data.synthetic.num_valid": 10,
      "data.synthetic.num_test": 10,
      "data.synthetic.num_zero_shot": 10,
      "train.num_steps": 4,
      "train.log_every": 1,
      "train.checkpoint_every": 2,
      "train.progress_bar": False,
      "eval.batch_size": 16,
      "eval.baselines": (),
      "eval.lora_baseline_rank": 0,
      "eval.baseline_learning_rates": (),
    },
  )


def preference_demo() -> ml_collections.ConfigDict:
  """The preference task's embedded default: the synthetic preference data and a tiny Qwen3
  built locally, on a CPU; chat SFT, DPO and a short GRPO, judged by the rule judge.

  The tiny backbone is warmed up under shuffled profiles, so the base model prefers the
  population's replies whoever asks; the profile reaches CuMA's routers through the n-gram
  encoder fitted to the training preferences, and the prompt as text (both methods).
  GRPO is rewarded by the rule judge that also scores the win-rate, so the headline is CA
  accuracy (docs/preference.md#synthetic-preferences).
  """
  return apply_overrides(
    schema.defaults(),
    {
      "task": "preference",
      **_TINY_CUMA,
      "adapter.demographic_dim": 16,
      "tiny_backbone.warmup_steps": 300,
      "data.dataset": "synthetic_preference",
      "data.max_length": 112,  # the longest synthetic example has 109 tokens
      "data.batch_size": 32,
      "preference.stages": ("sft", "dpo", "grpo"),
      "preference.max_prompt_length": 100,
      "preference.max_completion_length": 12,
      "optim.learning_rate": 5e-3,
      "optim.schedule": "cosine",
      "optim.warmup_steps": 10,
      "train.num_steps": 400,
      "train.checkpoint_every": 200,
      "train.keep_checkpoints": 2,
      "preference.dpo.num_steps": 60,
      "preference.dpo.batch_size": 16,
      "preference.dpo.learning_rate": 5e-4,
      "preference.grpo.num_steps": 16,
      "preference.grpo.learning_rate": 3e-4,
      "preference.grpo.prompts_per_step": 16,
      "preference.grpo.group_size": 4,
      "preference.grpo.max_new_tokens": 8,
      "preference.grpo.max_prompt_length": 100,
      "preference.grpo.reference_reply": "population_mode",
      "preference.eval.judge": "rule",
      "preference.eval.max_new_tokens": 12,
      "preference.eval.ca_rows": 0,
      "eval.batch_size": 64,
      "eval.baselines": ("lora",),
    },
  )


def preference_tiny() -> ml_collections.ConfigDict:
  """The preference demo shrunk to seconds: CI's smoke test of the whole preference job."""
  return apply_overrides(
    preference_demo(),
    {
      "adapter.demographic_dim": 4,
      "tiny_backbone.hidden_size": 32,
      "tiny_backbone.warmup_steps": 4,
      "tiny_backbone.warmup_batch_size": 8,
      "data.batch_size": 8,
      "data.synthetic_preference.num_users": 12,
      "data.synthetic_preference.num_questions": 4,
      "train.num_steps": 4,
      "train.log_every": 1,
      "train.checkpoint_every": 2,
      "train.progress_bar": False,
      "preference.dpo.num_steps": 2,
      "preference.grpo.num_steps": 2,
      "preference.grpo.prompts_per_step": 4,
      "preference.eval.max_new_tokens": 8,
      "eval.batch_size": 16,
    },
  )


def _preference_scale(dataset: str, released: bool, stages=("sft", "dpo")) -> Callable:
  """Chat SFT then DPO (and GRPO) on Community Alignment or PRISM with Qwen3-8B: the
  released scripts' recipe (``released``), or the paper's (top-k routing with the balance
  loss on both datasets; the schedule over the run's own length)."""
  community = dataset == "community_alignment"

  def scale() -> ml_collections.ConfigDict:
    overrides: Overrides = {
      "task": "preference",
      "model.architecture": "qwen3-8b",
      "data.dataset": dataset,
      "data.max_length": 2048,
      "data.batch_size": 16,
      "adapter.rank": 8,
      "adapter.alpha": 16.0,
      "adapter.num_experts": 8,
      "adapter.top_k": 2,
      "adapter.router_hidden": (256,),
      "adapter.dropout": 0.05,
      "adapter.targets": ("q_proj", "v_proj"),
      "optim.learning_rate": 2e-5,
      "optim.weight_decay": 0.01,
      "optim.schedule": "linear",
      "optim.warmup_steps": 100,
      "train.num_epochs": 1,
      "preference.stages": stages,
      "preference.max_prompt_length": 1024,
      "preference.max_completion_length": 1024,
      # Pairs per step and process: the released CA script takes one pair per GPU (8 on a
      # node of 8), PRISM 32.
      "preference.dpo.batch_size": 8 if community else 32,
      "preference.dpo.weight_decay": 0.01 if community else 0.0,
      "preference.eval.judge": "local_lm",
      "mesh.rules_preset": "fsdp",
    }
    if released:
      overrides["optim.horizon_steps"] = 1000
      overrides["data.supervision"] = "released"  # the reply, <|im_end|> and "\n"
      # The released chat SFT right-truncates the whole thread at 2048 tokens; its judge
      # prompt has a header line and reads the templated prompt as the context.
      overrides["preference.sft_truncation"] = "thread_end"
      overrides["preference.eval.judge_prompt"] = "released"
      if community:  # soft gates over every expert, no balance loss
        overrides.update({"adapter.gate": "top_probs", "adapter.top_k": 8, "optim.lambda_aux": 0.0})
      else:
        overrides["optim.lambda_aux"] = 0.01
      overrides["data.split_mode"] = "reference"
    return apply_overrides(schema.defaults(), overrides)

  return scale


def _preference_lora(dataset: str) -> Overrides:
  """The released preference scripts' LoRA baseline: q/v, rank 64 (CA) or 8 (PRISM), alpha
  2r, a constant 2e-5 without warm-up, AdamW's default betas."""
  rank = 64 if dataset == "community_alignment" else 8
  return {
    "adapter.rank": rank,
    "adapter.alpha": 2.0 * rank,
    "optim.schedule": "constant",
    "optim.warmup_steps": 0,
    "optim.b2": 0.999,
  }


_PREFERENCE_SCALES: dict[str, Callable[[], ml_collections.ConfigDict]] = {
  f"{short}_qwen3_8b{suffix}{'_grpo' if grpo else ''}": _preference_scale(
    dataset, released, ("sft", "dpo", "grpo") if grpo else ("sft", "dpo")
  )
  for short, dataset in (("ca", "community_alignment"), ("prism", "prism"))
  for suffix, released in (("", False), ("_released", True))
  for grpo in (False, True)
}

_PAPER_SCALES: dict[str, Callable[[], ml_collections.ConfigDict]] = {
  "qwen3_8b_r64": _paper_scale("qwen3-8b", 64, 5e-6),
  "qwen3_8b_r8": _paper_scale("qwen3-8b", 8, 2e-5),
  # The released Llama-3.1-8B script adapts q_proj and k_proj.
  "llama31_8b_r64": _paper_scale(
    "llama-3.1-8b", 64, 5e-6, **{"adapter.targets": ("q_proj", "k_proj")}
  ),
}
# The released training scripts' adapter layout: one A shared by a projection's experts, and
# one router per layer shared by q/k/v (another by gate/up). The paper scales keep per-expert
# A and a router per target: that layout reproduces the paper's trainable percentages.
RELEASED_LAYOUT: Overrides = {"adapter.shared_a": True, "adapter.share_router": True}


def _released_layout(scale: Callable[[], ml_collections.ConfigDict]) -> Callable:
  return lambda: apply_overrides(scale(), RELEASED_LAYOUT)


SCALES: dict[str, Callable[[], ml_collections.ConfigDict]] = {
  **_PAPER_SCALES,
  **{f"{name}_released": _released_layout(scale) for name, scale in _PAPER_SCALES.items()},
  "demo": demo,
  "tiny": tiny,
  **_PREFERENCE_SCALES,
  "preference_demo": preference_demo,
  "preference_tiny": preference_tiny,
}

# LoRA, prefix tuning and full fine-tuning are pinned to the released scripts' recipes (PEFT
# defaults included: LoRA's kaiming-uniform A; prefix init normal(0, 1), the field's
# default); HydraLoRA and MixLoRA take the scale's CuMA recipe (docs/configs.md).
METHODS: dict[str, Overrides] = {
  "cuma": {},
  "hydralora": {"adapter.shared_a": True, "adapter.router": "token"},
  "mixlora": {
    "adapter.shared_a": False,
    "adapter.router": "token",
    "adapter.router_hidden": (),
    "adapter.share_router": True,
  },
  "lora": {
    "adapter.router": "none",
    "adapter.num_experts": 1,
    "adapter.top_k": 1,
    "adapter.a_init": "kaiming_uniform",
    "optim.learning_rate": 2e-5,
    "optim.b2": 0.95,
  },
  "prefix": {"adapter.targets": (), "adapter.prefix_length": 32, "optim.learning_rate": 2e-5},
  "full": {"trainable": "all", "optim.learning_rate": 2e-5, "optim.b2": 0.95},
}


def scale_method(c: ml_collections.ConfigDict, method: str) -> Overrides:
  """``method``'s recipe at the scale of ``c``, applied after its table: at the 8B preference
  presets, LoRA takes the released preference scripts' rank and rate."""
  if c.task == "preference" and c.model.architecture != schema.TINY and method == "lora":
    return _preference_lora(c.data.dataset)
  return {}


# Keys a scale keeps against any method's table: the CPU scales' learning rate suits every
# method on the tiny backbone (the methods' rates are for 8B backbones).
SCALE_KEEPS: dict[str, tuple[str, ...]] = {
  "demo": ("optim.learning_rate",),
  "tiny": ("optim.learning_rate",),
  "preference_demo": ("optim.learning_rate",),
  "preference_tiny": ("optim.learning_rate",),
}

_NO_DEMOGRAPHICS = {"adapter.router": "token", "data.demographic_system_prompt": False}
_SOFT_ROUTING = {"adapter.gate": "top_probs"}
_NO_BALANCE_LOSS = {"optim.lambda_aux": 0.0}
# Ablations of CuMA (the paper's section 7). "minimal" is the released script's: without
# demographics and without the balance loss, top-k routing kept.
ABLATIONS: dict[str, Overrides] = {
  "none": {},
  "soft_routing": _SOFT_ROUTING,
  "no_demographics": _NO_DEMOGRAPHICS,
  "no_balance_loss": _NO_BALANCE_LOSS,
  "minimal": {**_NO_DEMOGRAPHICS, **_NO_BALANCE_LOSS},
}


def experiment_config(
  method: str,
  preset: str = DEFAULT_PRESET,
  ablation: str = "none",
  overrides: Overrides | None = None,
) -> ml_collections.ConfigDict:
  """The locked, validated config of ``method`` (and ``ablation``) at scale ``preset``.

  ``overrides`` sets dotted keys last, as ``--config.<key>=...`` does on the command line
  (``{"train.num_steps": 100}``); a key the config lacks is refused.
  """
  for name, value, allowed in (
    ("preset", preset, SCALES),
    ("method", method, METHODS),
    ("ablation", ablation, ABLATIONS),
  ):
    if value not in allowed:
      raise ValueError(f"{name} {value!r}; allowed: {tuple(allowed)}")
  if ablation != "none" and method != "cuma":
    raise ValueError(f"ablation {ablation!r} is an ablation of CuMA; method={method!r}")
  c = SCALES[preset]()
  kept = {key: _get(c, key) for key in SCALE_KEEPS.get(preset, ())}
  apply_overrides(c, METHODS[method])
  apply_overrides(c, scale_method(c, method))
  apply_overrides(c, kept)
  # A preference run's system turn is part of its data: the ablations' prompt switch stays off.
  skipped = schema.SURVEY_ONLY_KEYS if c.task == "preference" else ()
  apply_overrides(c, {k: v for k, v in ABLATIONS[ablation].items() if k not in skipped})
  c.method, c.ablation = method, ablation
  apply_overrides(c, overrides or {})
  # The scale's comparison baselines, less the method itself.
  c.eval.baselines = tuple(m for m in c.eval.baselines if m != method)
  c.eval.baseline_learning_rates = tuple(
    pair for pair in c.eval.baseline_learning_rates if pair[0] != method
  )
  schema.validate(c)
  schema.complete(c)
  c.lock()
  return c


def baseline_config(
  c: schema.Config, method: str, *, backbone: str, data_dir: str
) -> schema.Config:
  """``method`` trained beside run ``c`` (``eval.baselines``): its data, backbone and steps,
  with the method's adapter. On the tiny CPU backbone it keeps the run's optimiser too (the
  method table's is the recipe for an 8B backbone); at an 8B scale it takes the method's
  whole recipe, as ``experiment_config(method, preset)`` does (LoRA: its rank and rate).
  ``eval.lora_baseline_rank`` and ``eval.baseline_learning_rates`` give a baseline its own
  rank and rate over either."""
  b = ml_collections.ConfigDict(schema.as_dict(c))
  cpu_scale = c.model.architecture == schema.TINY
  table = {**METHODS[method], **({} if cpu_scale else scale_method(c, method))}
  apply_overrides(b, {k: v for k, v in table.items() if not (cpu_scale and k.startswith("optim."))})
  if method == "lora" and c.eval.lora_baseline_rank:
    rank = c.eval.lora_baseline_rank
    b.adapter.alpha, b.adapter.rank = b.adapter.alpha * rank / b.adapter.rank, rank
  b.optim.learning_rate = dict(c.eval.baseline_learning_rates).get(method, b.optim.learning_rate)
  b.method, b.ablation = method, "none"
  b.model.checkpoint, b.data.data_dir = backbone, data_dir
  b.adapter.init_from = ""  # the run's imported adapters are not the baseline's
  b.eval.update(baselines=(), lora_baseline_rank=0, baseline_learning_rates=())
  if b.task == "survey":
    b.eval.untrained = False  # the run evaluated the model it starts from
  return schema.validate(b)


def warmup_config(c: schema.Config) -> schema.Config:
  """The tiny backbone's warm-up stage: full fine-tuning without profiles in the prompt
  (range-checked; not validated as a run, which a preference config without profiles in its
  system turn would not pass)."""
  w = ml_collections.ConfigDict(schema.as_dict(c))
  w.method, w.ablation, w.trainable = "full", "none", "all"
  w.model.update(dtype="float32", param_dtype="float32", scan_layers=False, remat="none")
  w.data.demographic_system_prompt = False
  w.data.batch_size = c.tiny_backbone.warmup_batch_size
  w.optim.update(
    learning_rate=c.tiny_backbone.warmup_learning_rate,
    schedule="cosine",
    horizon_steps=0,
    warmup_steps=min(20, c.tiny_backbone.warmup_steps // 10),
    lambda_aux=0.0,
  )
  w.train.update(
    num_steps=c.tiny_backbone.warmup_steps,
    checkpoint_every=max(c.tiny_backbone.warmup_steps, 1),
  )
  return schema.from_dict(w.to_dict())
