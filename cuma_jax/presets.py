"""Experiment configurations: one schema, the paper's methods and scales as presets.

``configs/<experiment>.py`` files are thin ``get_config(preset)`` wrappers around
:func:`experiment_config`, so notebooks can build the same configs without absl.  Every
config has the same keys (locked: an unknown ``--config.x=...`` is refused) and
:func:`validate` rejects impossible values by key name before anything is loaded.
"""

from __future__ import annotations

import os

import ml_collections

from cuma_jax import sharding
from cuma_jax.encoders import POOLING_MODES
from cuma_jax.layers import dispatch, routing
from cuma_jax.layers.adapter_config import TARGET_MODULES, AdapterConfig
from cuma_jax.models.decoder import REMAT_POLICIES
from cuma_jax.params import TRAINABLE_MODES

ARCHITECTURES_DIR = os.path.join(os.path.dirname(__file__), "architectures")
METHODS = ("cuma", "lora", "hydralora", "mixlora", "prefix", "full")
ABLATIONS = ("none", "soft_routing", "no_demographics", "no_balance_loss", "minimal")
DATASETS = ("synthetic", "wvb")
SCHEDULES = ("constant", "linear", "cosine")
DTYPES = ("float32", "bfloat16")
MODES = ("train", "eval")
# Paper scales (section 7) and the CPU-sized ones.
SCALES = ("qwen3_8b_r64", "qwen3_8b_r8", "llama31_8b_r64", "demo", "tiny")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "cuma"
  c.ablation = "none"
  c.mode = "train"
  c.seed = 0

  c.model = ml_collections.ConfigDict(
    dict(
      checkpoint="",  # Local Hugging Face directory of the backbone.
      architecture="qwen3-8b",  # Bundled config.json for shape-only work (count).
      dtype="bfloat16",
      param_dtype="bfloat16",
      scan_layers=True,
      remat="full",
    )
  )
  c.encoder = ml_collections.ConfigDict(
    dict(
      checkpoint="",  # Local Qwen3-Embedding-style directory ("" = the backbone's own).
      precomputed="",  # .npz of profiles/embeddings; used instead of encoding when set.
      architecture="qwen3-embedding-0.6b",
      pooling="mean",
      max_length=128,
      projection=(),
      # Centre and scale each dimension over the training profiles (train statistics are
      # reused for evaluation); for weak encoders whose vectors are nearly parallel.
      standardize=False,
    )
  )
  c.adapter = ml_collections.ConfigDict(
    dict(
      targets=("q_proj", "v_proj"),
      rank=64,
      alpha=128.0,
      dropout=0.0,
      num_experts=8,
      top_k=2,
      shared_a=False,
      use_router=True,
      router_hidden=(256,),
      router_dropout=0.0,
      demographic_dim=1024,
      share_router=False,
      gate_mode="reference",
      strategy="auto",
      prefix_length=0,
    )
  )
  c.trainable = "adapters"
  c.data = ml_collections.ConfigDict(
    dict(
      dataset="wvb",
      builder_config="sampled_50k",
      manual_dir="",
      data_dir="",
      # batch_size is per process (each process reads its own shard of the data).
      max_length=1024,
      batch_size=16,
      demographic_system_prompt=True,
      shuffle_seed=42,
      # Synthetic survey sizes (ignored for wvb).
      synthetic=ml_collections.ConfigDict(
        dict(
          seed=0,
          num_cultures=4,
          num_countries=12,
          num_questions=24,
          num_train=2000,
          num_valid=0,
          num_test=250,
          num_zero_shot=250,
          # Sharp, culture-specific answers: the optimum beats the population mode by
          # 0.69 vs 0.27 accuracy (0.78 nats of cross-entropy per answer).
          answer_width=0.3,
          country_strength=5.0,
        )
      ),
    )
  )
  # Only used when model.checkpoint is "": the embedded default builds its own backbone.
  c.tiny_backbone = ml_collections.ConfigDict(
    dict(
      vocab_size=1024,
      hidden_size=64,
      num_layers=2,
      warmup_steps=300,
      warmup_learning_rate=3e-3,
      warmup_batch_size=32,
    )
  )
  c.optim = ml_collections.ConfigDict(
    dict(
      # Weight decay applies to matrices only (not biases, norm scales), as HF's Trainer.
      learning_rate=5e-6,
      b1=0.9,
      b2=0.999,
      weight_decay=0.01,
      schedule="constant",
      warmup_steps=0,
      grad_clip=1.0,
      accumulation_steps=1,
      label_smoothing=0.0,
      lambda_aux=0.01,
    )
  )
  c.train = ml_collections.ConfigDict(
    dict(
      num_epochs=3,
      num_steps=-1,
      log_every=10,
      checkpoint_every=500,
      keep_checkpoints=3,
      progress_bar=True,
      # An unreadable newest checkpoint: "fallback" resumes from the newest readable step
      # (moving the unreadable ones aside), "stop" stops and says how to discard it.
      on_corrupt_checkpoint="fallback",
    )
  )
  c.eval = ml_collections.ConfigDict(dict(batch_size=32, splits=("test",)))
  c.mesh = ml_collections.ConfigDict(
    dict(shape=(("data", -1), ("model", 1)), rules=tuple(sharding.DEFAULT_RULES))
  )
  return c


def _set_method(c, method: str) -> None:
  a = c.adapter
  if method == "cuma":
    pass
  elif method == "hydralora":
    a.shared_a, a.demographic_dim = True, 0
  elif method == "mixlora":
    a.shared_a, a.router_hidden, a.demographic_dim, a.share_router = False, (), 0, True
  elif method == "lora":
    a.use_router, a.num_experts, a.top_k, a.demographic_dim = False, 1, 1, 0
  elif method == "prefix":
    a.targets, a.prefix_length, a.demographic_dim = (), 32, 0
  elif method == "full":
    c.trainable = "all"
    if c.model.architecture:  # The paper's recipe; CPU scales keep their own rate.
      c.optim.learning_rate = 2e-5
  else:
    raise ValueError(f"method={method!r}; allowed: {METHODS}")
  c.method = method


def _set_ablation(c, ablation: str) -> None:
  if ablation in ("soft_routing", "minimal"):
    c.adapter.gate_mode = "soft"
  if ablation in ("no_demographics", "minimal"):
    c.adapter.demographic_dim = 0
    c.data.demographic_system_prompt = False
  if ablation in ("no_balance_loss", "minimal"):
    c.optim.lambda_aux = 0.0
  c.ablation = ablation


def _set_scale(c, scale: str) -> None:
  if scale in ("qwen3_8b_r64", "qwen3_8b_r8"):
    c.model.architecture = "qwen3-8b"
    if scale == "qwen3_8b_r8":
      c.adapter.rank, c.adapter.alpha, c.optim.learning_rate = 8, 16.0, 2e-5
  elif scale == "llama31_8b_r64":
    # The released Llama-3.1-8B script adapts q_proj and k_proj.
    c.model.architecture = "llama-3.1-8b"
    c.adapter.targets = ("q_proj", "k_proj")
  elif scale in ("demo", "tiny"):
    # CPU scale on the synthetic survey: a tiny Qwen3-shaped backbone built locally.
    c.model.update(
      checkpoint="",
      architecture="",
      dtype="float32",
      param_dtype="float32",
      scan_layers=False,
      remat="none",
    )
    c.encoder.update(checkpoint="", architecture="", standardize=True)
    c.adapter.update(
      rank=8,
      alpha=16.0,
      num_experts=4,
      top_k=2,
      router_hidden=(32,),
      targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    )
    # The profile reaches the model only through the router (no demographic system
    # prompt): the warmed-up base is exactly mean-collapsed on these prompts, and any
    # per-profile variation after training is CuMA's routing at work.
    c.data.update(
      dataset="synthetic", max_length=160, batch_size=32, demographic_system_prompt=False
    )
    c.optim.update(learning_rate=3e-3, schedule="cosine", warmup_steps=10)
    c.train.update(num_steps=800, log_every=10, checkpoint_every=200, keep_checkpoints=2)
    c.eval.batch_size = 128
    if scale == "tiny":
      c.data.synthetic.update(
        num_countries=4, num_questions=6, num_train=60, num_test=10, num_zero_shot=10
      )
      c.tiny_backbone.update(hidden_size=32, warmup_steps=4, warmup_batch_size=8)
      c.train.update(num_steps=4, log_every=1, checkpoint_every=2, progress_bar=False)
      c.data.batch_size = 8
      c.eval.batch_size = 16
    if c.adapter.demographic_dim:  # The tiny backbone doubles as the profile encoder.
      c.adapter.demographic_dim = c.tiny_backbone.hidden_size
  else:
    raise ValueError(f"preset scale {scale!r}; allowed: {SCALES}")


def experiment_config(
  method: str, preset: str, ablation: str = "none"
) -> ml_collections.ConfigDict:
  """The locked config of ``method`` (and ``ablation``) at scale ``preset``."""
  c = base_config()
  # Scale first: the method and the ablation then override the adapter fields they define.
  _set_scale(c, preset or "tiny")
  _set_method(c, method)
  if ablation not in ABLATIONS:
    raise ValueError(f"ablation={ablation!r}; allowed: {ABLATIONS}")
  _set_ablation(c, ablation)
  validate(c)
  c.lock()
  return c


def _choice(key, value, allowed):
  if value not in allowed:
    raise ValueError(f"config.{key}={value!r}; allowed: {tuple(allowed)}")


def validate(c: ml_collections.ConfigDict) -> None:
  """Refuses impossible values, naming the key and what is allowed."""
  _choice("method", c.method, METHODS)
  _choice("ablation", c.ablation, ABLATIONS)
  _choice("mode", c.mode, MODES)
  _choice("model.dtype", c.model.dtype, DTYPES)
  _choice("model.param_dtype", c.model.param_dtype, DTYPES)
  _choice("model.remat", c.model.remat, REMAT_POLICIES)
  _choice("encoder.pooling", c.encoder.pooling, POOLING_MODES)
  _choice("trainable", c.trainable, TRAINABLE_MODES)
  _choice("data.dataset", c.data.dataset, DATASETS)
  _choice("optim.schedule", c.optim.schedule, SCHEDULES)
  _choice("adapter.gate_mode", c.adapter.gate_mode, routing.GATE_MODES)
  _choice("adapter.strategy", c.adapter.strategy, dispatch.STRATEGIES)
  for t in c.adapter.targets:
    _choice("adapter.targets", t, TARGET_MODULES)
  if c.data.dataset == "wvb":
    _choice("data.builder_config", c.data.builder_config, ("full", "sampled_50k"))
  if c.model.architecture:
    _choice("model.architecture", c.model.architecture, available_architectures())
  positive = {
    "data.max_length": c.data.max_length,
    "data.batch_size": c.data.batch_size,
    "optim.accumulation_steps": c.optim.accumulation_steps,
    "eval.batch_size": c.eval.batch_size,
    "train.log_every": c.train.log_every,
    "train.checkpoint_every": c.train.checkpoint_every,
    "train.keep_checkpoints": c.train.keep_checkpoints,
  }
  for key, value in positive.items():
    if value < 1:
      raise ValueError(f"config.{key}={value}; must be >= 1")
  nonneg = {
    "optim.learning_rate": c.optim.learning_rate,
    "optim.weight_decay": c.optim.weight_decay,
    "optim.lambda_aux": c.optim.lambda_aux,
    "optim.warmup_steps": c.optim.warmup_steps,
    "optim.grad_clip": c.optim.grad_clip,
  }
  for key, value in nonneg.items():
    if value < 0:
      raise ValueError(f"config.{key}={value}; must be >= 0")
  if not 0 <= c.optim.label_smoothing < 1:
    raise ValueError(f"config.optim.label_smoothing={c.optim.label_smoothing}; must be in [0, 1)")
  if c.train.num_steps < 1 and c.train.num_epochs < 1:
    raise ValueError(
      "config.train.num_steps and config.train.num_epochs are both < 1: set one of them"
    )
  if c.trainable == "adapters" and c.method == "full":
    raise ValueError("config.method='full' needs config.trainable='all'")
  if c.method != "full":
    adapter_config(c)  # AdapterConfig's own checks name the adapter.* field.


def warmup_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The embedded default's warm-up stage: full fine-tuning without profiles in the prompt."""
  w = ml_collections.ConfigDict(c.to_dict())
  w.method, w.ablation, w.trainable = "full", "none", "all"
  w.model.update(dtype="float32", param_dtype="float32", scan_layers=False, remat="none")
  w.data.demographic_system_prompt = False
  w.data.batch_size = c.tiny_backbone.warmup_batch_size
  w.optim.update(
    learning_rate=c.tiny_backbone.warmup_learning_rate,
    schedule="cosine",
    warmup_steps=min(20, c.tiny_backbone.warmup_steps // 10),
    lambda_aux=0.0,
  )
  w.train.update(
    num_steps=c.tiny_backbone.warmup_steps, checkpoint_every=max(c.tiny_backbone.warmup_steps, 1)
  )
  w.lock()
  return w


def available_architectures() -> tuple[str, ...]:
  return tuple(sorted(f[:-5] for f in os.listdir(ARCHITECTURES_DIR) if f.endswith(".json")))


def adapter_config(c: ml_collections.ConfigDict) -> AdapterConfig | None:
  """The adapter the config injects (None for full fine-tuning)."""
  if c.method == "full":
    return None
  a = c.adapter
  return AdapterConfig(
    targets=tuple(a.targets),
    rank=a.rank,
    alpha=a.alpha,
    dropout=a.dropout,
    num_experts=a.num_experts,
    top_k=a.top_k,
    shared_a=a.shared_a,
    use_router=a.use_router,
    router_hidden=tuple(a.router_hidden),
    router_dropout=a.router_dropout,
    demographic_dim=a.demographic_dim if a.use_router else 0,
    demographic_projection=tuple(c.encoder.projection),
    share_router=a.share_router,
    gate_mode=a.gate_mode,
    strategy=a.strategy,
    prefix_length=a.prefix_length,
  )
