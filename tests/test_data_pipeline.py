"""TFDS (array_record, no TensorFlow) round trip of the synthetic survey, and the grain pipeline."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cuma_jax.data import builders, prompts
from cuma_jax.data.pipeline import SurveyTables, make_dataset
from cuma_jax.data.synthetic import SurveyOracle
from cuma_jax.data.wvb import WvbReader
from cuma_jax.tiny.tokenizer import build_tiny_tokenizer

tfds.disable_progress_bar()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  return tfds.data_source("cuma_synthetic_survey/tiny", data_dir=tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def train(sources):
  return sources["train"]


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


def test_data_source_reads_back_what_was_written(sources):
  raw = builders.RAW_DIR
  data_dir = sources["train"].dataset_info.data_dir
  reader = WvbReader(f"{data_dir}/{raw}")
  for split, source in sources.items():
    written = list(reader.examples(split))
    assert len(source) == len(written) > 0
    for i in (0, len(written) // 2, len(written) - 1):  # generation order is kept
      record = source[i]
      assert record["user"].decode() == written[i]["user"]
      assert record["profile"].decode() == written[i]["profile"]
      assert record["answer_letter"].decode() == written[i]["answer_letter"]
      assert list(record["option_codes"]) == written[i]["option_codes"]
      assert record["participant_id"] == written[i]["participant_id"]
    assert source.dataset_info.metadata["profiles"][split] == sorted(
      {e["profile"] for e in written}
    )
  oracle = builders.load_oracle(sources["test"])
  assert oracle.question_ids == SurveyOracle.load(f"{data_dir}/{raw}").question_ids


def test_builds_and_reads_without_tensorflow(tmp_path):
  """In a fresh interpreter, building and reading never imports TensorFlow (installed or not)."""
  script = textwrap.dedent(f"""
        import sys
        import tensorflow_datasets as tfds
        tfds.disable_progress_bar()
        from cuma_jax.data import builders
        from cuma_jax.tiny.wvb_fixture import write_wvb_fixture
        root = write_wvb_fixture({str(tmp_path / "wvb")!r})
        sources = tfds.data_source(
            "cuma_world_values_bench/full", data_dir={str(tmp_path / "tfds")!r},
            download_and_prepare_kwargs={{"download_config": tfds.download.DownloadConfig(
                manual_dir=str(root))}})
        print(len(sources["train"]), sources["train"][0]["answer_letter"].decode(),
              "tensorflow" in sys.modules)
    """)
  result = subprocess.run(
    [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120
  )
  assert result.returncode == 0, result.stderr[-3000:]
  count, _, tensorflow_imported = result.stdout.splitlines()[-1].split()
  assert (count, tensorflow_imported) == ("8", "False")


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
