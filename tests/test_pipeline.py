"""The grain pipeline over the synthetic survey's TFDS data source: batches, order, shards."""

import numpy as np
import pytest

from cuma_jax.data import prompts
from cuma_jax.data.pipeline import SurveyTables, make_dataset
from cuma_jax.tiny.tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def train(synthetic_sources):
  return synthetic_sources["train"]


@pytest.fixture(scope="module")
def tokenizer(train, tmp_path_factory):
  corpus = [train[i]["user"].decode() for i in range(0, len(train), 5)]
  corpus += [train[i]["profile"].decode() for i in range(0, len(train), 5)]
  return build_tiny_tokenizer(
    [*corpus, prompts.DEFAULT_SYSTEM_PROMPT], tmp_path_factory.mktemp("tok")
  )


def _batches(dataset, n=None):
  iterator = iter(dataset)
  return list(iterator) if n is None else [next(iterator) for _ in range(n)]


def test_batch_contents(train, tokenizer):
  dataset, tables = make_dataset(
    train, tokenizer, max_length=256, batch_size=8, seed=0, demographic_system_prompt=True
  )
  assert tables == SurveyTables(
    profiles=tuple(sorted({train[i]["profile"].decode() for i in range(len(train))})),
    question_ids=tuple(q["question_id"] for q in train.dataset_info.metadata["questions"]),
  )
  batch = _batches(dataset, 1)[0]
  assert set(batch) == {
    "input_ids",
    "attention_mask",
    "targets",
    "loss_mask",
    "prompt_length",
    "truncated_tokens",
    "profile_index",
    "question_index",
    "answer_option",
    "option_count",
    "option_codes",
    "example_index",
  }
  assert batch["input_ids"].shape == (8, 256) and batch["option_codes"].shape == (8, 26)
  for row in range(8):
    record = train[int(batch["example_index"][row])]
    letter = record["answer_letter"].decode()
    supervised = batch["targets"][row][batch["loss_mask"][row].astype(bool)]
    assert tokenizer.decode(supervised) == letter + "<|im_end|>"
    assert prompts.LETTERS[batch["answer_option"][row]] == letter
    profile = tables.profiles[batch["profile_index"][row]]
    assert profile == record["profile"].decode()
    assert tables.question_ids[batch["question_index"][row]] == record["question_id"].decode()
    prompt = tokenizer.decode(batch["input_ids"][row][: batch["prompt_length"][row] + 1])
    assert prompt.startswith(f"<|im_start|>system\n{profile}<|im_end|>\n<|im_start|>user\n")
    count = batch["option_count"][row]
    assert list(batch["option_codes"][row][:count]) == list(record["option_codes"])
    assert (batch["option_codes"][row][count:] == -1).all()


def test_same_seed_same_order_and_reshuffled_epochs(train, tokenizer):
  def order(seed, epochs=1):
    dataset, _ = make_dataset(
      train,
      tokenizer,
      max_length=128,
      batch_size=4,
      seed=seed,
      num_epochs=epochs,
      drop_remainder=False,
    )
    return np.concatenate([b["example_index"] for b in _batches(dataset)])

  first = order(7)
  np.testing.assert_array_equal(first, order(7))
  assert sorted(first) == list(range(len(train)))
  assert not np.array_equal(first, order(8))
  two = order(7, epochs=2)
  np.testing.assert_array_equal(two[: len(train)], first)
  assert not np.array_equal(two[len(train) :], first)
  unshuffled, _ = make_dataset(
    train, tokenizer, max_length=128, batch_size=4, shuffle=False, drop_remainder=False
  )
  np.testing.assert_array_equal(
    np.concatenate([b["example_index"] for b in _batches(unshuffled)]), range(len(train))
  )


def test_process_shards_are_disjoint_and_cover(train, tokenizer):
  seen = []
  for shard in range(3):
    dataset, _ = make_dataset(
      train,
      tokenizer,
      max_length=128,
      batch_size=5,
      seed=1,
      shard_index=shard,
      shard_count=3,
      drop_remainder=False,
    )
    indices = np.concatenate([b["example_index"] for b in _batches(dataset)])
    assert (indices % 3 == shard).all()
    seen.append(set(indices.tolist()))
  assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
  assert set.union(*seen) == set(range(len(train)))


def test_checkpointed_iterator_resumes_exactly(train, tokenizer):
  dataset, _ = make_dataset(
    train, tokenizer, max_length=128, batch_size=16, seed=3, num_epochs=None
  )
  iterator = iter(dataset)
  for _ in range(len(train) // 16 - 1):  # the continuation crosses an epoch boundary
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(4)]

  resumed = iter(
    make_dataset(train, tokenizer, max_length=128, batch_size=16, seed=3, num_epochs=None)[0]
  )
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key, value in want.items():
      np.testing.assert_array_equal(got[key], value, err_msg=key)
