"""The DPO and GRPO training objectives on a tiny random CuMA-adapted Qwen3.

The reference policy's log-probabilities are checked against Hugging Face's torch model on
the same token ids, the losses against numpy implementations of their formulas over
log-probabilities computed from the full logits, GRPO's rollouts against a direct call of
``generation.generate`` with the same key, and its rewards and advantages against a scripted
reward and numpy.
"""

import json
import re

from conftest import TINY
from helpers import CUMA, D_DEMO, randomise
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

from cuma_jax import generation
from cuma_jax.data import chat
from cuma_jax.models.pretrained import load_pretrained
from cuma_jax.params import filter_tree, is_adapter_path, split_params
from cuma_jax.training import preference
from cuma_jax.training.step import make_train_step

# Whole training steps on a model; the formulas alone are fast (test_training_preference.py).
pytestmark = pytest.mark.slow

PROFILES = ("Country: Japan, Age: 25-34", "Country: Peru, Gender: Female")
PROMPTS = [
  [
    {"role": "system", "content": f"User Profile: {PROFILES[0]}"},
    {"role": "user", "content": "How should I spend a free Sunday?"},
  ],
  [
    {"role": "system", "content": f"User Profile: {PROFILES[1]}"},
    {"role": "user", "content": "What should I cook?"},
    {"role": "assistant", "content": "A rice dish."},
    {"role": "user", "content": "Lighter?"},
  ],
]
PAIRS = [("Visit my family.", "Go hiking in the hills."), ("Fresh salads.", "Roast meat.")]
LENGTHS = chat.Lengths(max_length=128, max_prompt=108, max_completion=20)
BETA = 0.1
LAMBDA_AUX = 0.01


def _record(index, prompt, chosen, rejected):
  return {
    "id": f"synthetic:c{index}:0:0",
    "source": "synthetic",
    "conversation_id": f"c{index}",
    "turn": 0,
    "profile": PROFILES[index],
    "profile_fields": "{}",
    "messages": json.dumps(prompt),
    "chosen": chosen,
    "rejected": rejected,
    "question": "",
    "options": [],
    "answer": -1,
    "question_id": "",
    "chosen_option": -1,
  }


RECORDS = [_record(i, p, *pair) for i, (p, pair) in enumerate(zip(PROMPTS, PAIRS, strict=True))]


@pytest.fixture(scope="module")
def setup(chat_tokenizer, tmp_path_factory):
  """(tokenizer, torch model, module, params with nonzero LoRA B, backbone params, the
  demographic table [profiles, d]) of a random Qwen3 sized to the chat tokenizer."""
  tokenizer = chat_tokenizer("qwen3")
  directory = tmp_path_factory.mktemp("preference_qwen3")
  config = transformers.Qwen3Config(
    **{**TINY, "vocab_size": len(tokenizer), "max_position_embeddings": 256},
    tie_word_embeddings=False,
  )
  torch.manual_seed(0)
  torch_model = transformers.Qwen3ForCausalLM(config).eval()
  torch_model.save_pretrained(directory)
  module, params = load_pretrained(directory, adapter=CUMA, rng=jax.random.key(1))
  params = randomise(params, 2, scale=0.05, names={"b"})
  backbone = filter_tree(params, lambda p: not is_adapter_path(p))
  table = np.random.default_rng(3).normal(size=(len(PROFILES), D_DEMO)).astype(np.float32)
  return tokenizer, torch_model, module, params, backbone, table


def _torch_token_log_probs(torch_model, ids, attention_mask, targets, loss_mask):
  """[rows, K] log p of each row's supervised targets (in order) by the torch model, each row
  run alone without its padding."""
  out = []
  for row in range(ids.shape[0]):
    n = int(attention_mask[row].sum())
    with torch.no_grad():
      logits = torch_model(torch.as_tensor(ids[row : row + 1, :n], dtype=torch.long)).logits[0]
    log_p = torch.log_softmax(logits.double(), -1).numpy()
    positions = np.flatnonzero(loss_mask[row])
    out.append(log_p[positions, targets[row, positions]])
  return out


def _full_logit_log_probs(module, params, ids, attention_mask, targets, loss_mask, z):
  """[rows] lists of log p of the supervised targets from the adapted model's FULL logits."""
  logits, _ = jax.jit(module.apply)(
    {"params": params},
    jnp.asarray(ids),
    attention_mask=jnp.asarray(attention_mask),
    demographics=jnp.asarray(z),
  )
  logits = np.asarray(logits, np.float64)
  top = logits.max(-1, keepdims=True)
  log_p = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  out = []
  for row in range(ids.shape[0]):
    positions = np.flatnonzero(loss_mask[row])
    out.append(log_p[row, positions, targets[row, positions]])
  return out


def _batch(kind, tokenizer):
  """The batch of both records, in order."""
  dataset = chat.make_chat_dataset(
    kind, RECORDS, tokenizer, LENGTHS, batch_size=2, profiles=PROFILES, shuffle=False
  )
  return next(iter(dataset))


def _log_sigmoid(x):
  return -np.log1p(np.exp(-x))


def _changed(before, after):
  return [
    not np.array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
  ]


def test_dpo_reference_loss_and_one_step(setup):
  tokenizer, torch_model, module, params, backbone, table = setup
  batch = _batch("dpo", tokenizer)
  assert batch["truncated_tokens"].tolist() == [0, 0]
  # The default reference: the adapters switched off, read inside the step from the frozen
  # backbone (no copy); its log-probs are checked through the loss against torch's.
  reference = preference.Reference(module.clone(adapter=None))
  objective = preference.dpo_objective(
    module, reference, beta=BETA, lambda_aux=LAMBDA_AUX, max_targets=LENGTHS.max_completion
  )
  assert objective.prepare is None and "reference_log_probs" not in objective.batch_keys
  trainable, frozen = split_params(params)
  prepared = batch

  flat = {
    k: batch[k].reshape(4, -1) for k in ("input_ids", "attention_mask", "targets", "loss_mask")
  }
  z_rows = table[np.repeat(batch["profile_index"], 2)]
  expected_ref = _torch_token_log_probs(torch_model, *flat.values())
  ref = np.array([r.sum() for r in expected_ref]).reshape(2, 2)

  policy_tokens = _full_logit_log_probs(module, params, *flat.values(), z_rows)
  policy = np.array([p.sum() for p in policy_tokens]).reshape(2, 2)
  assert np.all(np.abs(policy - ref) > 1e-3)  # the randomised adapters change the model

  margin = BETA * ((policy[:, 0] - ref[:, 0]) - (policy[:, 1] - ref[:, 1]))
  expected_loss = -np.mean(_log_sigmoid(margin))
  model_batch = {k: jnp.asarray(prepared[k]) for k in objective.batch_keys}
  z = jnp.asarray(table[batch["profile_index"]])
  frozen_before = jax.tree.map(np.array, frozen)
  tx = optax.adamw(1e-3)
  step = jax.jit(make_train_step(objective, tx))
  new_trainable, _, metrics = step(trainable, frozen, tx.init(trainable), model_batch, z, None)
  # The step's metrics are those of the parameters before its update.
  np.testing.assert_allclose(metrics["task_loss"], expected_loss, rtol=1e-4)
  # Log-probs agree with torch to ~1e-5; the margin is beta times their differences.
  np.testing.assert_allclose(metrics["reward_margin"], margin.mean(), rtol=1e-3, atol=1e-5)
  assert metrics["balance_loss"] > 0
  np.testing.assert_allclose(
    metrics["loss"], expected_loss + LAMBDA_AUX * metrics["balance_loss"], rtol=1e-4
  )
  assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
  assert jax.tree.structure(new_trainable) == jax.tree.structure(trainable)
  assert all(_changed(trainable, new_trainable))
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(frozen_before), strict=True):
    np.testing.assert_array_equal(np.asarray(a), b)

  # A fixed reference (reference="sft": the adapters as the stage starts) is scored on the
  # host: its log-probs are the policy's own, so the first loss is log 2.
  fixed = preference.Reference(module, jax.tree.map(jnp.copy, trainable))
  objective = preference.dpo_objective(
    module, fixed, beta=BETA, lambda_aux=LAMBDA_AUX, max_targets=LENGTHS.max_completion
  )
  prepared = objective.prepare(batch, trainable, frozen, table, jax.random.key(0))
  np.testing.assert_allclose(prepared["reference_log_probs"], policy, rtol=1e-5, atol=1e-4)
  model_batch = {k: jnp.asarray(prepared[k]) for k in objective.batch_keys}
  _, _, metrics = jax.jit(make_train_step(objective, tx))(
    trainable, frozen, tx.init(trainable), model_batch, z, None
  )
  np.testing.assert_allclose(metrics["task_loss"], np.log(2.0), rtol=1e-4)


def _sampling(tokenizer):
  """Sampled replies of at most 6 tokens, ended by <|im_end|>."""
  return generation.SamplingConfig(
    max_new_tokens=6,
    temperature=1.0,
    stop_tokens=(tokenizer.convert_tokens_to_ids("<|im_end|>"),),
    pad_token=tokenizer.pad_token_id,
  )


def _scripted_reward(example_index, texts):
  """The decoded reply's length, plus 100 per prompt index (so that mixing prompts up shows)."""
  return np.array([len(t) + 100 * i for i, t in zip(example_index, texts, strict=True)], np.float32)


def _strip_hidden(text):
  return re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL).strip()


def test_grpo_rollouts_rewards_advantages_loss_and_step(setup):
  tokenizer, torch_model, module, params, backbone, table = setup
  group, kl_beta = 4, 0.04
  prompts = _batch("prompt", tokenizer)
  sampling = _sampling(tokenizer)
  rollout = preference.Rollout(tokenizer, sampling, group, _scripted_reward)
  # The KL reference: the adapters off, read inside the step (checked through the loss).
  reference = preference.Reference(module.clone(adapter=None))
  objective = preference.grpo_objective(
    module,
    rollout,
    clip_epsilon=0.2,
    loss_type="dapo",
    kl_beta=kl_beta,
    reference=reference,
    lambda_aux=0.0,
  )
  trainable, frozen = split_params(params)
  rng = jax.random.key(7)
  prepared = objective.prepare(prompts, trainable, frozen, table, rng)

  # The oracle rollout: the same prompts, each repeated group_size times, the same key.
  ids = np.repeat(prompts["input_ids"], group, axis=0)
  mask = np.repeat(prompts["attention_mask"], group, axis=0)
  z_rows = table[np.repeat(prompts["profile_index"], group)]
  out = generation.generate(module, params, ids, mask, sampling, demographics=z_rows, rng=rng)
  completions = [out.tokens[i, : out.lengths[i]].tolist() for i in range(len(ids))]
  texts = [_strip_hidden(tokenizer.decode(c, skip_special_tokens=True)) for c in completions]
  assert len(set(texts)) > 1
  for i, completion in enumerate(completions):
    n = int(mask[i].sum())
    row_mask = prepared["loss_mask"][i] == 1
    np.testing.assert_array_equal(prepared["input_ids"][i, :n], ids[i, :n])
    np.testing.assert_array_equal(prepared["targets"][i, row_mask], completion)
    np.testing.assert_array_equal(np.flatnonzero(row_mask), range(n - 1, n - 1 + len(completion)))
  np.testing.assert_array_equal(prepared["profile_index"], np.repeat(prompts["profile_index"], 4))

  rewards = np.array([len(t) + 100 * (i // group) for i, t in enumerate(texts)], np.float64)
  np.testing.assert_allclose(prepared["rewards"], rewards)
  grouped = rewards.reshape(-1, group)
  advantages = (grouped - grouped.mean(1, keepdims=True)) / (
    grouped.std(1, ddof=1, keepdims=True) + 1e-4
  )
  np.testing.assert_allclose(prepared["advantages"], advantages.reshape(-1), rtol=1e-5, atol=1e-5)
  assert np.abs(advantages).max() > 0.1

  # The reference's per-token log-probs: torch's (the backbone), in completion order.
  rows = [prepared[k] for k in ("input_ids", "attention_mask", "targets", "loss_mask")]
  expected_ref = _torch_token_log_probs(torch_model, *rows)

  # The loss at the sampling policy (ratio 1): -A per token plus beta k3(policy || reference),
  # averaged over every completion token of the batch ("dapo").
  policy = _full_logit_log_probs(module, params, *rows, z_rows)
  per_token = [
    -advantages.reshape(-1)[i] + kl_beta * (np.exp(r - p) - (r - p) - 1)
    for i, (p, r) in enumerate(zip(policy, expected_ref, strict=True))
  ]
  expected_loss = np.concatenate(per_token).sum() / sum(len(p) for p in per_token)
  model_batch = {k: jnp.asarray(prepared[k]) for k in objective.batch_keys}
  z = jnp.asarray(table[prepared["profile_index"]])
  tx = optax.adamw(1e-3)
  step = jax.jit(make_train_step(objective, tx))
  new_trainable, _, metrics = step(trainable, frozen, tx.init(trainable), model_batch, z, None)
  np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(metrics["reward"], rewards.mean(), rtol=1e-6)
  assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
  assert any(_changed(trainable, new_trainable))


def test_grpo_with_equal_rewards_has_no_gradient(setup):
  tokenizer, _, module, params, _, table = setup
  prompts = _batch("prompt", tokenizer)
  rollout = preference.Rollout(
    tokenizer, _sampling(tokenizer), 4, lambda index, texts: np.ones(len(texts))
  )
  objective = preference.grpo_objective(
    module, rollout, clip_epsilon=0.2, loss_type="grpo", kl_beta=0.0, reference=None, lambda_aux=0.0
  )
  trainable, frozen = split_params(params)
  prepared = objective.prepare(prompts, trainable, frozen, table, jax.random.key(8))
  np.testing.assert_array_equal(prepared["advantages"], 0.0)
  np.testing.assert_array_equal(prepared["rewards"], 1.0)
  model_batch = {k: jnp.asarray(prepared[k]) for k in objective.batch_keys}
  z = jnp.asarray(table[prepared["profile_index"]])
  grads, metrics = jax.jit(jax.grad(objective.loss, has_aux=True))(
    trainable, frozen, model_batch, z, None
  )
  assert float(metrics["task_loss"]) == 0.0
  for g in jax.tree.leaves(grads):
    np.testing.assert_array_equal(np.asarray(g), 0.0)
