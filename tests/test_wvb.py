"""The WorldValuesBench reader on the hand-written fixture (`cuma_jax.tiny.wvb_fixture`)."""

import pytest

from cuma_jax.data import prompts
from cuma_jax.data.wvb import SkipCounts, WvbReader, split_files, write_wvb_tree
from cuma_jax.tiny.wvb_fixture import CODEBOOK, QUESTION_METADATA


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
    "skipped_questions": ["Q999"],
  }
  assert counts.skipped_examples == 6


def test_missing_directory_file_and_empty_split_errors(wvb_root, tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere.*does not exist"):
    WvbReader(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="codebook.json"):
    WvbReader(tmp_path)
  with pytest.raises(FileNotFoundError, match=r"split 'probe'.*probe_demographic_qa.tsv"):
    list(WvbReader(wvb_root).examples("probe"))

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


def test_split_files_layout(tmp_path):
  assert split_files(tmp_path, "valid") == (
    tmp_path / "WorldValuesBench/valid/valid_demographic_qa.tsv",
    tmp_path / "WorldValuesBench/valid/valid_value_qa.tsv",
  )
