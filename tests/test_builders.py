"""TFDS builders (array_record, no TensorFlow): the synthetic survey and WorldValuesBench."""

import json
import os
from pathlib import Path
import subprocess
import sys
import textwrap

from helpers import edit_lines
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from cuma_jax.data import builders
from cuma_jax.data.synthetic import SurveyOracle
from cuma_jax.data.wvb import WvbReader, split_files
from cuma_jax.tiny.wvb_fixture import write_wvb_fixture


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


@pytest.mark.slow  # a fresh interpreter
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


def test_prepared_data_are_keyed_by_the_manual_directory_contents(tmp_path):
  root = write_wvb_fixture(tmp_path / "manual")
  data = ml_collections.ConfigDict(dict(dataset="wvb", builder_config="full", manual_dir=str(root)))
  logs = []
  first = builders.prepared_builder(data, str(tmp_path / "tfds"), logs.append)
  again = builders.prepared_builder(data, str(tmp_path / "tfds"), logs.append)
  assert again.data_dir == first.data_dir
  assert logs == [
    f"preparing the dataset in {first.data_dir}",
    f"reusing the dataset prepared in {first.data_dir} (its inputs are unchanged)",
  ]
  _, values = split_files(root, "train")
  edit_lines(
    values, lambda lines: lines.__setitem__(1, lines[1].replace("156070001\t1", "156070001\t3"))
  )
  changed = builders.prepared_builder(data, str(tmp_path / "tfds"), logs.append)
  assert changed.data_dir != first.data_dir
  assert logs[2:] == [f"preparing the dataset in {changed.data_dir}"]
  answers = {
    (int(r["participant_id"]), r["question_id"].decode()): int(r["answer_code"])
    for r in changed.as_data_source()["train"]
  }
  assert answers[(156070001, "Q1")] == 3


def test_an_interrupted_preparation_is_cleaned_up_by_the_next(tmp_path):
  # TFDS prepares into <config>/incomplete.<random>_<version>/ and renames it when done; a
  # killed preparation left that folder (with its shards) behind for good.
  root = write_wvb_fixture(tmp_path / "manual")
  data = ml_collections.ConfigDict(dict(dataset="wvb", builder_config="full", manual_dir=str(root)))
  builder = builders.prepared_builder(data, str(tmp_path / "tfds"), lambda *_: None)
  left = Path(builder.data_dir).parent / "incomplete.abc123_1.0.0"
  (left / "shard").mkdir(parents=True)
  os.utime(left, (0, 0))
  logs = []
  again = builders.prepared_builder(data, str(tmp_path / "tfds"), logs.append)
  assert not left.exists() and logs[-1] == (
    f"removed {left}, left by an interrupted preparation of this dataset"
  )
  assert again.data_dir == builder.data_dir and len(again.as_data_source()["train"]) > 0


def test_splits_sharing_a_participant_are_refused_before_anything_is_written(tmp_path):
  root = write_wvb_fixture(tmp_path / "manual")
  _, test_values = split_files(root, "test")
  edit_lines(test_values, lambda lines: lines.insert(2, "818070002\t1\t1\t1\t1"))
  data = ml_collections.ConfigDict(dict(dataset="wvb", builder_config="full", manual_dir=str(root)))
  with pytest.raises(ValueError, match=r"shares 1 participants .*818070002"):
    builders.prepared_builder(data, str(tmp_path / "tfds"), lambda *_: None)
  written = [p.name for p in (tmp_path / "tfds").rglob("*") if p.is_file()]
  assert not [n for n in written if "array_record" in n or n == "dataset_info.json"], written


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


def _released_sample(root, split, size, seed=42):
  """(participant id, question id, profile) of the released preprocessing's sample, written
  here from its description with pandas, as it reads the TSVs.

  The value TSV is inner-joined with the profile columns of the demographic TSV (value rows
  keep their order); each row yields its columns starting with "Q", in order, whose cell is a
  number >= 0 (or a string of digits) that is one of the codebook's choices >= 0; the profile
  sentence formats the pandas values with str(), so an empty cell reads "nan". The sample is
  HF datasets' shuffle(seed).select(range(size)): numpy's default_rng(seed) permutation.
  """
  import pandas as pd

  codebook = json.loads((root / "dataset_construction/codebook.json").read_text())
  demographic_path, value_path = split_files(root, split)
  demographic = pd.read_csv(demographic_path, sep="\t", index_col="D_INTERVIEW")
  values = pd.read_csv(value_path, sep="\t", index_col="D_INTERVIEW")
  columns = ["B_COUNTRY", "X003R", "Q260", "Q275", "Q273", "Q289", "Q290", "Q279"]
  joined = values.join(demographic[columns], how="inner")
  rows = []
  for pid, row in joined.iterrows():
    country, age, gender, education, marital, religion, ethnicity, employment = (
      str(row[c]) for c in columns
    )
    if age.endswith("years"):
      age = age.replace(" years", " years old")
    profile = (
      f"You are a person from {country}, age group: {age}, gender: {gender}, education: "
      f"{education}, marital status: {marital}, religion: {religion}, ethnicity: {ethnicity}, "
      f"employment: {employment}."
    )
    for question in (c for c in values.columns if c.startswith("Q")):
      cell = row[question]
      if isinstance(cell, str):
        code = int(cell) if cell.strip().isdigit() else None
      else:
        code = None if pd.isna(cell) else int(cell)
      choices = {int(c) for c in codebook.get(question, {}).get("choices", {}) if int(c) >= 0}
      if code is not None and code in choices:
        rows.append((int(pid), question, profile))
  order = np.random.default_rng(seed).permutation(len(rows))[:size]
  return [rows[i] for i in order]


def test_sampled_50k_selects_the_released_rows(wvb_root, tmp_path):
  configs = {c.name: c for c in builders.CumaWorldValuesBench.BUILDER_CONFIGS}
  assert configs["sampled_50k"].incomplete_profiles == "nan"
  assert configs["full"].incomplete_profiles == "drop"
  assert (configs["sampled_50k"].valid_size, configs["sampled_50k"].sample_seed) == (5000, 42)
  config = builders.WvbConfig(
    name="sampled_7",
    train_size=7,
    test_size=4,
    valid_size=2,
    sample_seed=42,
    incomplete_profiles="nan",
  )
  builder = builders.CumaWorldValuesBench(data_dir=tmp_path, config=config)
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=str(wvb_root))
  )
  sources = builder.as_data_source()
  participants = {}
  for split, size in (("train", 7), ("valid", 2), ("test", 4)):
    got = [
      (int(r["participant_id"]), r["question_id"].decode(), r["profile"].decode())
      for r in sources[split]
    ]
    assert got == _released_sample(wvb_root, split, size)
    participants[split] = {pid for pid, *_ in got}
  # The valid sample comes from WVB's valid split: no participant of train or test.
  assert participants["valid"] and not participants["valid"] & (
    participants["train"] | participants["test"]
  )
  # The participant with an empty ethnicity is in the permuted rows (10 of them, not 8).
  assert len(_released_sample(wvb_root, "train", 100)) == 10


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
