"""WorldValuesBench reader, prompts and TFDS builder on the hand-written fixture."""

import json

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from cuma_jax.data import builders, prompts
from cuma_jax.data.wvb import SkipCounts, WvbReader, split_files, write_wvb_tree
from cuma_jax.tiny.wvb_fixture import write_wvb_fixture

tfds.disable_progress_bar()


@pytest.fixture(scope="module")
def wvb_root(tmp_path_factory):
  return write_wvb_fixture(tmp_path_factory.mktemp("wvb"))


def test_worked_example_character_for_character(wvb_root):
  first = next(WvbReader(wvb_root).examples("train"))
  assert first["user"] == (
    "Important in life: Family? A. Very important B. Rather important C. Not very important "
    "D. Not at all important. You can only choose one option."
  )
  assert first["profile"] == (
    "You are a person from China, age group: 25-34 years old, gender: Female, education: "
    "Bachelor or equivalent (ISCED 6), marital status: Married, religion: Do not belong to a "
    "denomination, ethnicity: CN: Han Chinese, employment: Full time (30 hours a week or "
    "more)."
  )
  assert prompts.DEFAULT_SYSTEM_PROMPT == (
    "You are a helpful assistant that answers survey questions honestly."
  )
  assert (
    first["question_id"],
    first["participant_id"],
    first["answer_letter"],
    first["answer_option"],
    first["answer_code"],
    first["option_codes"],
    first["num_options"],
  ) == ("Q1", 156070001, "A", 0, 1, [1, 2, 3, 4], 4)
  assert first["demographics"]["age_group"] == "25-34 years old"


def test_ten_point_scale_prompt_and_old_age_group(wvb_root):
  examples = list(WvbReader(wvb_root).examples("train"))
  us = next(e for e in examples if e["participant_id"] == 840070003)
  assert us["question_id"] == "Q106" and us["answer_letter"] == "J" and us["answer_code"] == 10
  assert us["user"] == (
    "Income equality vs larger income differences? A. Incomes more equal B. 2 C. 3 D. 4 "
    "E. 5 F. 6 G. 7 H. 8 I. 9 J. Larger income differences. You can only choose one option."
  )
  assert "age group: 65 and more years old," in us["profile"]


def test_question_mark_is_appended_as_the_released_code_does():
  assert prompts.user_prompt("Why?", ["Yes", "No"]) == (
    "Why?? A. Yes B. No. You can only choose one option."
  )
  with pytest.raises(ValueError):
    prompts.user_prompt("Q", [str(i) for i in range(27)])


def test_examples_and_skip_counts(wvb_root):
  counts = SkipCounts()
  got = [
    (e["participant_id"], e["question_id"], e["answer_letter"])
    for e in WvbReader(wvb_root).examples("train", counts)
  ]
  assert got == [
    (156070001, "Q1", "A"),
    (156070001, "Q46", "B"),
    (156070001, "Q106", "G"),
    (818070002, "Q1", "A"),
    (840070003, "Q106", "J"),
    (410070006, "Q1", "B"),
    (410070006, "Q46", "D"),
    (410070006, "Q106", "A"),
  ]
  assert counts.as_dict() == {
    "examples": 8,
    "missing_answer": 4,
    "negative_answer": 1,
    "non_numeric_answer": 1,
    "answer_not_in_options": 1,
    "participants_missing_profile": 2,
    "examples_missing_profile": 3,
    "participants_nan_profile": 0,
    "examples_nan_profile": 0,
    "malformed_rows": 0,
    "skipped_questions": ["Q999"],
  }
  assert counts.skipped_examples == 6


def test_incomplete_profile_kept_as_nan(wvb_root):
  counts = SkipCounts()
  examples = list(WvbReader(wvb_root).examples("train", counts, incomplete_profiles="nan"))
  germany = [e for e in examples if e["participant_id"] == 276070004]
  assert [(e["question_id"], e["answer_letter"]) for e in germany] == [("Q1", "B"), ("Q46", "A")]
  assert germany[0]["demographics"]["ethnicity"] == "nan"
  assert germany[0]["profile"] == (
    "You are a person from Germany, age group: 45-54 years old, gender: Male, education: "
    "Short-cycle tertiary education (ISCED 5), marital status: Divorced, religion: Roman "
    "Catholic, ethnicity: nan, employment: Self employed."
  )
  # Only the participant without a demographic row is dropped now (as an inner join drops it).
  assert (counts.examples, counts.participants_missing_profile) == (10, 1)
  assert (counts.participants_nan_profile, counts.examples_nan_profile) == (1, 2)
  with pytest.raises(ValueError, match=r"incomplete_profiles='keep'.*\('drop', 'nan'\)"):
    list(WvbReader(wvb_root).examples("train", incomplete_profiles="keep"))


def test_missing_directory_file_and_empty_split_errors(wvb_root, tmp_path):
  with pytest.raises(FileNotFoundError, match=r"nowhere.*does not exist.*docs/data\.md"):
    WvbReader(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="codebook.json"):
    WvbReader(tmp_path)
  with pytest.raises(FileNotFoundError, match=r"split 'probe'.*probe_demographic_qa.tsv"):
    list(WvbReader(wvb_root).examples("probe"))

  from cuma_jax.tiny.wvb_fixture import CODEBOOK, QUESTION_METADATA

  demographic = [
    {
      "D_INTERVIEW": "1",
      "B_COUNTRY": "Chile",
      "X003R": "16-24 years",
      "Q260": "Male",
      "Q275": "x",
      "Q273": "x",
      "Q289": "x",
      "Q290": "x",
      "Q279": "x",
    }
  ]
  values = [{"D_INTERVIEW": "1", "Q1": "", "Q46": "-2"}]
  write_wvb_tree(tmp_path / "empty", CODEBOOK, QUESTION_METADATA, {"train": (demographic, values)})
  with pytest.raises(ValueError, match="split 'train' of .*empty has no valid"):
    list(WvbReader(tmp_path / "empty").examples("train"))


def _edit(path, edit):
  lines = path.read_text().split("\n")
  edit(lines)
  path.write_text("\n".join(lines))


def test_malformed_rows_are_named_counted_and_skipped(wvb_root, tmp_path, caplog):
  root = write_wvb_fixture(tmp_path)
  demographic, values = split_files(root, "train")

  def break_values(lines):
    lines[2] = lines[2].replace("818070002\t1\t\t", "818070002\t1\t")  # Q46's tab dropped
    lines[3] = lines[3].replace("840070003", "84007OOO3")
    lines.insert(2, "")  # A blank line 3 moves those two rows to lines 4 and 5.

  _edit(values, break_values)
  # 410070006's H_URBRURAL cell lost (line 6: 392070005 has no demographic row).
  _edit(demographic, lambda lines: lines.__setitem__(5, lines[5].replace("\tUrban\t", "\t", 1)))
  counts = SkipCounts()
  got = [(e["participant_id"], e["question_id"]) for e in WvbReader(root).examples("train", counts)]
  # Only 156070001 is left: 818070002's answers would have shifted onto the next questions,
  # 840070003 has no usable id, and 410070006's profile row lost a cell.
  assert got == [(156070001, "Q1"), (156070001, "Q46"), (156070001, "Q106")]
  assert counts.malformed_rows == 4 and counts.examples_missing_profile == 3 + 3
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert f"{demographic} line 6: 9 cells where the header has 10" in warnings[0]
  assert f"{values} line 3: blank line; row skipped" in warnings[1]
  assert f"{values} line 4: 4 cells where the header has 5" in warnings[2]
  assert f"{values} line 5: column 1 (D_INTERVIEW): participant id '84007OOO3'" in warnings[3]


@pytest.mark.parametrize(
  "header, message",
  [
    ("156070001\t1\t2\t7\t3", r"line 1: the header has no D_INTERVIEW column"),
    ("D_INTERVIEW\tQ1\tQ46\tQ1\tQ999", r"line 1, columns 2 and 4: the header names 'Q1' twice"),
    ("D_INTERVIEW\tQ1\t\tQ106\tQ999", r"line 1, column 3: the header has an empty column name"),
  ],
  ids=["no_header", "duplicate", "empty_name"],
)
def test_file_with_a_wrong_header_is_refused(tmp_path, header, message):
  root = write_wvb_fixture(tmp_path)
  _, values = split_files(root, "train")
  _edit(values, lambda lines: lines.__setitem__(0, header))
  with pytest.raises(ValueError, match=rf"train_value_qa\.tsv {message}"):
    list(WvbReader(root).examples("train"))


def test_prepared_data_are_keyed_by_the_manual_directory_contents(tmp_path):
  root = write_wvb_fixture(tmp_path / "manual")
  data = ml_collections.ConfigDict(dict(dataset="wvb", builder_config="full", manual_dir=str(root)))
  logs = []
  first = builders.prepared_builder(data, str(tmp_path / "tfds"), logs.append)
  again = builders.prepared_builder(data, str(tmp_path / "tfds"), logs.append)
  assert again.data_dir == first.data_dir
  assert logs == [f"reusing the dataset prepared in {first.data_dir} (its inputs are unchanged)"]
  _, values = split_files(root, "train")
  _edit(
    values, lambda lines: lines.__setitem__(1, lines[1].replace("156070001\t1", "156070001\t3"))
  )
  changed = builders.prepared_builder(data, str(tmp_path / "tfds"), logs.append)
  assert changed.data_dir != first.data_dir and len(logs) == 1
  answers = {
    (int(r["participant_id"]), r["question_id"].decode()): int(r["answer_code"])
    for r in changed.as_data_source()["train"]
  }
  assert answers[(156070001, "Q1")] == 3


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
  config = builders.WvbConfig(
    name="sampled_7", train_size=7, test_size=4, sample_seed=42, incomplete_profiles="nan"
  )
  builder = builders.CumaWorldValuesBench(data_dir=tmp_path, config=config)
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=str(wvb_root))
  )
  sources = builder.as_data_source()
  for split, size in (("train", 7), ("test", 4)):
    got = [
      (int(r["participant_id"]), r["question_id"].decode(), r["profile"].decode())
      for r in sources[split]
    ]
    assert got == _released_sample(wvb_root, split, size)
  # The participant with an empty ethnicity is in the permuted rows (10 of them, not 8).
  assert len(_released_sample(wvb_root, "train", 100)) == 10


def test_split_files_layout(tmp_path):
  assert split_files(tmp_path, "valid") == (
    tmp_path / "WorldValuesBench/valid/valid_demographic_qa.tsv",
    tmp_path / "WorldValuesBench/valid/valid_value_qa.tsv",
  )
