"""The WorldValuesBench reader on the hand-written fixture (`cuma_jax.tiny.wvb_fixture`)."""

from helpers import edit_lines
import pytest

from cuma_jax.data import prompts
from cuma_jax.data.wvb import SkipCounts, WvbReader, split_files, write_wvb_tree
from cuma_jax.tiny.wvb_fixture import CODEBOOK, QUESTION_METADATA, write_wvb_fixture


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
    "participants_nan_profile": 0,
    "examples_nan_profile": 0,
    "malformed_rows": 0,
    "duplicate_rows": 0,
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


def test_malformed_rows_are_named_counted_and_skipped(wvb_root, tmp_path, caplog):
  root = write_wvb_fixture(tmp_path)
  demographic, values = split_files(root, "train")

  def break_values(lines):
    lines[2] = lines[2].replace("818070002\t1\t\t", "818070002\t1\t")  # Q46's tab dropped
    lines[3] = lines[3].replace("840070003", "84007OOO3")
    lines.insert(2, "")  # A blank line 3 moves those two rows to lines 4 and 5.

  edit_lines(values, break_values)
  # 410070006's H_URBRURAL cell lost (line 6: 392070005 has no demographic row).
  edit_lines(
    demographic, lambda lines: lines.__setitem__(5, lines[5].replace("\tUrban\t", "\t", 1))
  )
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


def test_a_repeated_participant_keeps_its_first_row_and_a_shared_one_is_refused(tmp_path, caplog):
  root = write_wvb_fixture(tmp_path)
  demographic, values = split_files(root, "train")
  # 156070001 again, with other answers (line 8) and another profile (line 8).
  edit_lines(values, lambda lines: lines.insert(7, "156070001\t3\t3\t3\t3"))
  edit_lines(demographic, lambda lines: lines.insert(7, lines[1].replace("China", "Peru")))
  counts = SkipCounts()
  got = [e for e in WvbReader(root).examples("train", counts) if e["participant_id"] == 156070001]
  assert [(e["question_id"], e["answer_code"]) for e in got] == [("Q1", 1), ("Q46", 2), ("Q106", 7)]
  assert {e["demographics"]["country"] for e in got} == {"China"}
  assert counts.duplicate_rows == 2 and counts.as_dict()["duplicate_rows"] == 2
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  for path in (demographic, values):
    assert f"{path} line 8: participant 156070001 repeats line 2; the first row is kept" in (
      "".join(warnings)
    )

  # A participant of train in test too: refused, naming both files' lines and the id.
  _, test_values = split_files(root, "test")
  edit_lines(test_values, lambda lines: lines.insert(2, "818070002\t1\t1\t1\t1"))
  WvbReader(root).check_disjoint(("train", "valid"))
  with pytest.raises(
    ValueError,
    match=rf"{test_values} shares 1 participants with an earlier split: 818070002 \(line 3, and "
    rf"{values} line 3\); the splits must be participant-disjoint",
  ):
    WvbReader(root).check_disjoint(("train", "valid", "test"))


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
  edit_lines(values, lambda lines: lines.__setitem__(0, header))
  with pytest.raises(ValueError, match=rf"train_value_qa\.tsv {message}"):
    list(WvbReader(root).examples("train"))


def test_split_files_layout(tmp_path):
  assert split_files(tmp_path, "valid") == (
    tmp_path / "WorldValuesBench/valid/valid_demographic_qa.tsv",
    tmp_path / "WorldValuesBench/valid/valid_value_qa.tsv",
  )
