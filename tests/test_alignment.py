"""The preference task end to end: `python -m cuma_jax.main` on `preference_tiny` (chat SFT,
DPO, GRPO, evaluation, the LoRA baseline), resumed in eval mode; and the config checks.

The run is the session fixture `preference_run` (conftest.py), which the preference notebook's
test reuses."""

import collections
import json
import os
import pathlib
import shutil
import subprocess
import sys
import types

from flax import traverse_util
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import load_file

import cuma_jax
from cuma_jax import presets, schema
from cuma_jax.data.tokenize import render_prompt
from cuma_jax.evaluation import preference as evaluation
from cuma_jax.params import split_params
from cuma_jax.tasks import preference
from cuma_jax.training import loop
from cuma_jax.training.checkpointing import CheckpointInputsMismatch

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = f"--config={ROOT}/configs/cuma.py:preference_tiny"


def _main(*args):
  return subprocess.run(
    [sys.executable, "-m", "cuma_jax.main", CONFIG, *args],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=900,
  )


def _jsonl(path):
  return [json.loads(line) for line in open(path)]


def test_preference_job_runs_every_stage_and_reports(preference_run):
  proc, workdir = preference_run
  for name in ("base", "cuma", "optimum", "population_mode", "lora"):
    assert f"] {name:>16}: CA accuracy" in proc.stdout.replace("[preference] ", "] ")
  config = presets.experiment_config("cuma", "preference_tiny")
  for stage, steps in (
    ("sft", config.train.num_steps),
    ("dpo", config.preference.dpo.num_steps),
    ("grpo", config.preference.grpo.num_steps),
  ):
    records = _jsonl(workdir / stage / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, steps + 1)), stage
  dpo = _jsonl(workdir / "dpo" / "metrics.jsonl")
  assert all(0.0 <= r["reward_accuracy"] <= 1.0 for r in dpo)
  grpo = _jsonl(workdir / "grpo" / "metrics.jsonl")
  assert all(0.0 <= r["reward"] <= 1.0 and r["completion_tokens"] >= 1 for r in grpo)
  assert (workdir / "adapters").is_dir()

  results = json.loads(pathlib.Path(workdir / "results.json").read_text())
  assert set(results) == {"base", "trained", "references", "baselines", "exports", "run"}
  assert "win_rate" not in results["base"]  # the base is what the others are judged against
  predictions = workdir / "predictions"
  for model, result in (("cuma", results["trained"]), ("lora", results["baselines"]["lora"])):
    verdicts = _jsonl(predictions / f"{model}_win_rate.jsonl")
    counts = collections.Counter(v["outcome"] for v in verdicts)
    tally = result["win_rate"]
    assert (tally["wins"], tally["ties"], tally["losses"]) == (
      counts["win"],
      counts["tie"],
      counts["loss"],
    )
    assert tally["win_rate"] == pytest.approx(counts["win"] / len(verdicts))
    ca = _jsonl(predictions / f"{model}_ca.jsonl")
    assert result["ca"]["rows"] == len(ca) > 0
    hits = sum(r["predicted"] == r["answer"] for r in ca)
    assert result["ca"]["accuracy"] == pytest.approx(hits / len(ca))
  # Every judged case shows the same base reply to every model.
  base_replies = [v["base_reply"] for v in _jsonl(predictions / "cuma_win_rate.jsonl")]
  assert base_replies == [v["base_reply"] for v in _jsonl(predictions / "lora_win_rate.jsonl")]


def test_eval_mode_restores_the_last_stage(preference_run):
  proc, workdir = preference_run
  first = json.loads(pathlib.Path(workdir / "results.json").read_text())
  again = _main(f"--workdir={workdir}", "--config.mode=eval", "--config.eval.baselines=()")
  assert again.returncode == 0, again.stderr[-3000:]
  assert "sft:" not in again.stdout  # nothing trained
  second = json.loads(pathlib.Path(workdir / "results.json").read_text())
  assert second["trained"] == first["trained"]
  assert second["base"] == first["base"]


def test_restore_dispatches_a_preference_workdir_to_its_last_stage(preference_run):
  """`cuma_jax.restore` reads the task from the workdir: the trained adapters it gives back
  are those the run exported (WORKDIR/adapters, read as plain safetensors)."""
  _, workdir = preference_run
  aligned = cuma_jax.restore(str(workdir), log=lambda *_: None)
  assert isinstance(aligned, preference.Aligned) and aligned.config.task == "preference"
  trainable, _ = split_params(aligned.params, aligned.config.trainable)
  flat = traverse_util.flatten_dict(trainable)
  exported = load_file(str(workdir / "adapters" / "adapters.safetensors"))
  assert sorted(exported) == sorted("/".join(path) for path in flat)
  for path, value in flat.items():
    np.testing.assert_array_equal(np.asarray(value), exported["/".join(path)])


def test_each_model_samples_its_replies_with_its_own_key(preference_run):
  _, workdir = preference_run
  config = schema.validate(presets.experiment_config("cuma", "preference_tiny"))
  aligned = preference.prepare(config, str(workdir), log=lambda *_: None)
  ev = preference.evaluation_set(aligned, log=lambda *_: None)
  base = aligned.base()
  # The base's own weights under another name: sampled with the base's key, it would repeat
  # every base reply token for token (all ties, so a win-rate of 0 that measures nothing).
  twin = evaluation.Model("twin", base.module, base.params)
  replies = preference._replies(aligned, twin, ev.cases)
  assert replies != ev.base_replies
  assert replies == preference._replies(aligned, twin, ev.cases)  # seeded
  assert preference._replies(aligned, base, ev.cases) == ev.base_replies  # sampled once


@pytest.mark.parametrize("judge_prompt", ["project", "released"])
def test_the_judge_reads_the_context_its_prompt_asks_for(chat_tokenizer, judge_prompt):
  tokenizer = chat_tokenizer("qwen3")
  config = _preference(**{"preference.eval.judge_prompt": judge_prompt})
  aligned = types.SimpleNamespace(config=config, tokenizer=tokenizer)
  messages = [
    {"role": "system", "content": "User Profile: Country: Peru"},
    {"role": "user", "content": "Hi?"},
  ]
  context = preference.Aligned.context(aligned, messages)
  if judge_prompt == "released":  # the templated prompt, as the released DPO prompt column
    assert context == render_prompt(tokenizer, messages)
    assert context.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
  else:
    assert context == "user: Hi?"


def _preference(**overrides):
  c = presets.SCALES["preference_tiny"]()
  presets.apply_overrides(c, overrides)
  return c


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"data.dataset": "synthetic"}, "task='preference'; that task reads"),
    ({"data.dataset": "prism", "encoder.kind": "decoder"}, "judge='rule' judges the synthetic"),
    (
      {
        "data.dataset": "prism",
        "encoder.kind": "decoder",
        "preference.eval.judge": "local_lm",
      },
      "reference_reply='population_mode' exists for the synthetic",
    ),
    (
      {
        "data.dataset": "prism",
        "preference.eval.judge": "local_lm",
        "preference.eval.judge_checkpoint": "/judge",
        "preference.grpo.reference_reply": "chosen",
      },
      "fitted_ngrams' fits to answers",
    ),
    ({"preference.eval.judge_prompt": "released"}, "judge_prompt='released' is a local LM"),
    ({"preference.stages": ("dpo", "sft")}, "in the order ('sft', 'dpo', 'grpo')"),
    ({"preference.stages": ("sft", "sft")}, "distinct stages"),
    ({"eval.splits": ("zero_shot",)}, "config.eval.splits=('zero_shot',) is not read"),
    ({"data.demographic_system_prompt": False}, "demographic_system_prompt=False is not read"),
    ({"preference.max_prompt_length": 128}, "max_prompt_length=128 must be below"),
    ({"preference.grpo.group_size": 1}, "config.preference.grpo.group_size=1; must be >= 2"),
  ],
)
def test_preference_configs_are_refused_naming_the_key(overrides, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    schema.validate(_preference(**overrides))


def test_a_local_judge_needs_its_checkpoint_before_anything_runs(tmp_path):
  c = _preference(
    **{
      "preference.eval.judge": "local_lm",
      "encoder.kind": "decoder",
      "adapter.demographic_dim": 32,  # the tiny backbone's width: it encodes the profiles
    }
  )
  with pytest.raises(FileNotFoundError, match="judge_checkpoint='' is not a directory"):
    preference.run(c, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
  "key, value",
  [
    ("preference.dpo.beta", 0.5),
    ("data.split_mode", "reference"),
    ("data.synthetic_preference.num_users", 30),
  ],
)
def test_a_survey_config_refuses_preference_keys(key, value):
  c = presets.SCALES["tiny"]()
  presets.apply_overrides(c, {key: value})
  with pytest.raises(ValueError, match=f"config.{key}={value!r} is not read by task='survey'"):
    schema.validate(c)


def test_a_preference_config_refuses_survey_data_keys():
  c = _preference(**{"data.synthetic.num_questions": 3})
  with pytest.raises(ValueError, match="data.synthetic.num_questions=3 is not read by task="):
    schema.validate(c)


def test_every_preference_preset_validates():
  names = [n for n in presets.SCALES if n.startswith(("ca_", "prism_", "preference_"))]
  assert len(names) == 10
  for name in names:
    for method in ("cuma", "lora"):
      c = presets.experiment_config(method, name)
      assert isinstance(c, ml_collections.ConfigDict) and c.task == "preference"


def test_a_stage_retrained_under_a_finished_later_stage_is_refused(preference_run, tmp_path):
  _, workdir = preference_run
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  steps = presets.experiment_config("cuma", "preference_tiny").train.num_steps
  config = presets.experiment_config(
    "cuma", "preference_tiny", overrides={"train.num_steps": steps + 1, "eval.baselines": ()}
  )
  # In this process: the SFT stage trains one more step, then its DPO is refused.
  with pytest.raises(CheckpointInputsMismatch, match="previous_stage") as refused:
    cuma_jax.run(config, str(copy), log=lambda *_: None)
  assert "dpo" in str(refused.value)


def test_stage_lengths_follow_epochs_batches_and_accumulation():
  c = _preference(**{"optim.accumulation_steps": 2, "train.num_steps": -1, "train.num_epochs": 3})
  # SFT: 3 epochs of 1,000 rows in batches of 8, two batches per update.
  assert loop.total_steps(c, 1000) == 3 * (1000 // 8) // 2
  # DPO with num_steps=-1: one epoch of the pairs in its own batch size.
  assert loop.total_steps(c, 1000, num_steps=-1, num_epochs=1, batch_size=10) == 100 // 2
  assert loop.total_steps(c, 1000, num_steps=7, num_epochs=1, batch_size=10) == 7
