"""Every shipped config file builds at every preset, and each method keeps its identity."""

import glob
import importlib.util
import os

import pytest

from cuma_jax import presets, schema
from cuma_jax.param_count import count_parameters

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
FILES = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.py")))


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_every_experiment_of_the_paper_has_a_config_file():
  names = {os.path.basename(f)[:-3] for f in FILES}
  assert names == {
    "cuma",
    "full_finetune",
    "lora",
    "hydralora",
    "mixlora",
    "prefix_tuning",
    "ablation_soft_routing",
    "ablation_no_demographics",
    "ablation_no_balance_loss",
    "ablation_minimal",
  }


@pytest.mark.parametrize("path", FILES, ids=lambda p: os.path.basename(p)[:-3])
@pytest.mark.parametrize("preset", presets.SCALES)
def test_config_builds_and_keeps_its_method(path, preset):
  c = schema.validate(_load(path).get_config(preset))
  adapter = schema.adapter_config(c)
  if c.method == "lora":
    assert (adapter.router, adapter.num_experts, adapter.top_k) == ("none", 1, 1)
  elif c.method == "mixlora":
    assert adapter.router_hidden == () and adapter.share_router and not adapter.shared_a
  elif c.method == "hydralora":
    assert adapter.shared_a and not adapter.uses_demographics
  elif c.method == "prefix":
    assert adapter.targets == () and adapter.prefix_length == 32
  elif c.method == "full":
    assert adapter is None and c.trainable == "all"
  else:
    assert adapter.num_experts > 1 and adapter.router_hidden
    # The released survey scripts share A and the router; the released preference scripts
    # keep per-expert A, and their CA recipe routes softly over every expert without the
    # balance loss.
    released = preset.endswith("_released") and c.task == "survey"
    soft_recipe = preset.startswith("ca_") and "_released" in preset
    assert (adapter.shared_a, adapter.share_router) == (released, released)
    assert adapter.uses_demographics == (c.ablation not in ("no_demographics", "minimal"))
    assert (adapter.gate == "top_probs") == (c.ablation == "soft_routing" or soft_recipe)
    assert (c.optim.lambda_aux == 0) == (
      c.ablation in ("no_balance_loss", "minimal") or soft_recipe
    )


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


_MINIMAL = {"ablation": "minimal", "adapter.router": "token", "optim.lambda_aux": 0.0}


@pytest.mark.parametrize(
  "preset, expected",
  [
    ("qwen3_8b_r64", {**_MINIMAL, "data.demographic_system_prompt": False}),
    ("demo", {**_MINIMAL, "data.demographic_system_prompt": False}),
  ],
)
def test_minimal_ablation_is_the_released_scripts(preset, expected):
  # The released script: no demographic embedding (router on x), no profile in the system
  # prompt, no balance loss; top-k routing kept (the gate is CuMA's).
  cuma = _flat(presets.experiment_config("cuma", preset).to_dict())
  minimal = _flat(presets.experiment_config("cuma", preset, "minimal").to_dict())
  assert {k: minimal[k] for k in cuma if cuma[k] != minimal[k]} == expected


@pytest.mark.parametrize("preset", ["qwen3_8b_r64", "qwen3_8b_r8", "llama31_8b_r64"])
def test_baselines_are_pinned_to_the_released_scripts(preset):
  # train_lora_sft / train_prefix_sft / train_fft_sft: lr 2e-5; AdamW betas (0.9, 0.95) for
  # LoRA and full fine-tuning, torch's default (0.9, 0.999) for prefix tuning; PEFT's LoRA A
  # (kaiming-uniform) and prefix embedding (normal(0, 1)) initialisations.
  lora = presets.experiment_config("lora", preset)
  prefix = presets.experiment_config("prefix", preset)
  full = presets.experiment_config("full", preset)
  assert (lora.optim.learning_rate, lora.optim.b1, lora.optim.b2) == (2e-5, 0.9, 0.95)
  assert lora.adapter.a_init == "kaiming_uniform"
  assert (prefix.optim.learning_rate, prefix.optim.b2, prefix.adapter.prefix_init_std) == (
    2e-5,
    0.999,
    1.0,
  )
  assert (full.optim.learning_rate, full.optim.b2) == (2e-5, 0.95)
  assert presets.experiment_config("cuma", preset).adapter.a_init == "normal"


@pytest.mark.parametrize("method", list(presets.METHODS))
def test_cpu_scales_keep_their_learning_rate(method):
  assert presets.experiment_config(method, "demo").optim.learning_rate == 3e-3
  assert presets.experiment_config(method, "tiny").optim.learning_rate == 3e-3


def test_a_baseline_is_trained_the_way_of_its_run():
  run = schema.validate(
    presets.experiment_config(
      "cuma", "tiny", overrides={"eval.baselines": ("lora", "full"), "data.batch_size": 4}
    )
  )
  baseline = presets.baseline_config(run, "lora", backbone="/backbone", data_dir="/tfds")
  lora = schema.validate(presets.experiment_config("lora", "tiny"))
  assert (baseline.method, baseline.ablation, baseline.eval.baselines) == ("lora", "none", ())
  assert baseline.adapter == lora.adapter  # the method's adapter...
  assert baseline.optim == run.optim and baseline.train == run.train  # ...trained as the run
  same_data = lambda c: {**schema.as_dict(c.data), "data_dir": ""}  # noqa: E731
  assert same_data(baseline) == same_data(run) and baseline.seed == run.seed  # profile in prompt
  assert (baseline.model.checkpoint, baseline.data.data_dir) == ("/backbone", "/tfds")


@pytest.mark.slow  # four parameter counts at the demo's size
def test_the_demos_baselines_get_cumas_parameter_budget_and_their_own_rate():
  run = schema.validate(presets.experiment_config("cuma", "demo"))
  lora = presets.baseline_config(run, "lora", backbone="/backbone", data_dir="/tfds")
  assert run.data.demographic_system_prompt and lora.data.demographic_system_prompt
  assert (lora.adapter.rank, lora.adapter.alpha / lora.adapter.rank) == (
    run.eval.lora_baseline_rank,
    run.adapter.alpha / run.adapter.rank,
  )
  assert lora.optim.learning_rate == dict(run.eval.baseline_learning_rates)["lora"]
  # Matched: within 2% of CuMA's trainable parameters, and no rank step closer.
  cuma_count = count_parameters(run)["trainable"]
  gap = lambda rank: abs(  # noqa: E731
    count_parameters(presets.experiment_config("lora", "demo", overrides={"adapter.rank": rank}))[
      "trainable"
    ]
    - cuma_count
  )
  assert gap(lora.adapter.rank) <= 0.02 * cuma_count
  assert gap(lora.adapter.rank) <= min(gap(lora.adapter.rank - 4), gap(lora.adapter.rank + 4))
  with pytest.raises(ValueError, match=r"baseline_learning_rates entry \('prefix', 0.1\)"):
    presets.experiment_config(
      "cuma", "demo", overrides={"eval.baseline_learning_rates": (("prefix", 0.1),)}
    )
  with pytest.raises(
    ValueError, match=r"baseline_learning_rates=\(\('lora', inf\),\); must be finite"
  ):
    presets.experiment_config(
      "cuma", "demo", overrides={"eval.baseline_learning_rates": (("lora", float("inf")),)}
    )


@pytest.mark.parametrize("preset", ["ca_qwen3_8b", "prism_qwen3_8b_released", "qwen3_8b_r8"])
def test_a_baseline_at_an_8b_scale_takes_its_methods_recipe(preset):
  # LoRA beside an 8B CuMA run is LoRA's recipe at that scale (CA: rank 64; the rate, its
  # schedule and betas), not CuMA's rank and rate.
  run = schema.validate(presets.experiment_config("cuma", preset))
  baseline = presets.baseline_config(run, "lora", backbone="/backbone", data_dir="/tfds")
  lora = schema.validate(presets.experiment_config("lora", preset))
  assert baseline.adapter == lora.adapter and baseline.optim == lora.optim
  assert baseline.adapter.rank == (64 if preset == "ca_qwen3_8b" else 8)
  assert baseline.optim.learning_rate == 2e-5
  assert baseline.data.dataset == run.data.dataset and baseline.train == run.train


def test_overrides_are_set_last_validated_and_refused_when_unknown():
  config = presets.experiment_config("cuma", "tiny", overrides={"train.num_steps": 7})
  assert config.train.num_steps == 7 and config.adapter.num_experts == 4
  with pytest.raises(KeyError, match="train.steps"):
    presets.experiment_config("cuma", "tiny", overrides={"train.steps": 7})
  with pytest.raises(ValueError, match="top_k"):
    presets.experiment_config("cuma", "tiny", overrides={"adapter.top_k": 9})


@pytest.mark.parametrize("dataset", ["ca", "prism"])
def test_released_preference_presets_truncate_and_judge_as_the_release(dataset):
  released = presets.experiment_config("cuma", f"{dataset}_qwen3_8b_released")
  assert released.preference.sft_truncation == "thread_end"  # the thread cut at 2048
  assert released.data.max_length == 2048
  assert released.preference.eval.judge_prompt == "released"
  paper = presets.experiment_config("cuma", f"{dataset}_qwen3_8b")
  assert paper.preference.sft_truncation == "prompt_start"
  assert paper.preference.eval.judge_prompt == "project"
