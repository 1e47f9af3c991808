"""TFDS builders (array_record, no TensorFlow): the synthetic survey and WorldValuesBench."""

import subprocess
import sys
import textwrap

import numpy as np
import tensorflow_datasets as tfds

from cuma_jax.data import builders
from cuma_jax.data.synthetic import SurveyOracle
from cuma_jax.data.wvb import WvbReader


def test_data_source_reads_back_what_was_written(synthetic_sources):
  sources = synthetic_sources
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


def _key(example):
  return (example["participant_id"], example["question_id"])


def _decoded(record):
  """A TFDS record with bytes -> str and numpy -> Python, comparable to a reader example."""
  if isinstance(record, dict):
    return {k: _decoded(v) for k, v in record.items()}
  if isinstance(record, bytes):
    return record.decode()
  if isinstance(record, (list, np.ndarray)):
    return [int(v) for v in record]
  return int(record)


def test_tfds_full_config_reads_back_every_example(wvb_root, tmp_path):
  sources = tfds.data_source(
    "cuma_world_values_bench/full",
    data_dir=tmp_path,
    download_and_prepare_kwargs={
      "download_config": tfds.download.DownloadConfig(manual_dir=str(wvb_root))
    },
  )
  reader = WvbReader(wvb_root)
  assert {split: len(source) for split, source in sources.items()} == {
    "train": 8,
    "valid": 3,
    "test": 6,
  }
  for split, source in sources.items():
    expected = sorted(reader.examples(split), key=_key)
    assert sorted((_decoded(r) for r in source), key=_key) == expected
  metadata = sources["train"].dataset_info.metadata
  assert metadata["profiles"]["test"] == sorted({e["profile"] for e in reader.examples("test")})
  assert [q["question_id"] for q in metadata["questions"]] == ["Q1", "Q46", "Q106"]
  assert metadata["skip_counts"]["train"]["answer_not_in_options"] == 1


def test_tfds_sampled_config_matches_seeded_permutation(wvb_root, tmp_path):
  config = builders.WvbConfig(name="sampled_5", train_size=5, test_size=2, sample_seed=42)
  builder = builders.CumaWorldValuesBench(data_dir=tmp_path, config=config)
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=str(wvb_root))
  )
  sources = builder.as_data_source()
  reader = WvbReader(wvb_root)
  for split, size in (("train", 5), ("test", 2)):
    examples = list(reader.examples(split))
    order = np.random.default_rng(42).permutation(len(examples))[:size]
    assert [_decoded(r) for r in sources[split]] == [examples[i] for i in order]
