"""WorldValuesBench (WVB) manual directories: read them into examples, and write the layout.

A manual directory is what WVB's own `data_preparation.py` produces (docs/data.md#worldvaluesbench-on-disk):

    <root>/WorldValuesBench/<split>/<split>_demographic_qa.tsv   one row per participant
    <root>/WorldValuesBench/<split>/<split>_value_qa.tsv         one column per value question
    <root>/dataset_construction/codebook.json                    answer code -> choice text
    <root>/dataset_construction/question_metadata.json           answer scales

One example is one (participant, value question) cell holding a valid answer code: an integer
>= 0 that is one of the question's codebook choices. Rows are visited in file order and
questions in column order, as the authors' preprocessing does, so seeded sampling over the
example sequence selects the same examples as theirs. Unusable cells are skipped and counted
(`SkipCounts`), and so are participants without a demographic row and malformed rows (a blank
line, a row whose cell count differs from the header's — a dropped tab would shift answers onto
other questions — or a non-integer participant id), which are also logged with their file and
line. A file whose header is not a WVB header is refused. A participant with an empty profile
field is either dropped (`DROP`) or kept with the field reading "nan" (`AS_NAN`), which is what
the released preprocessing writes, since it reads the TSVs with pandas.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
import csv
import dataclasses
import functools
import json
import logging
from pathlib import Path
from typing import Any, NamedTuple

from cuma_jax.data import prompts

logger = logging.getLogger(__name__)

ID_COLUMN = "D_INTERVIEW"
# What becomes of a participant with an empty profile field (docs/data.md).
DROP = "drop"  # skipped and counted
AS_NAN = "nan"  # kept; the field reads "nan", as pandas' NaN prints in the released prompts
INCOMPLETE_PROFILES = (DROP, AS_NAN)
# This repository's description of the manual directory, named by errors about it.
DOCS = "docs/data.md"
# Malformed rows logged one by one per split; the rest are only counted.
LOGGED_MALFORMED_ROWS = 10
CODEBOOK = Path("dataset_construction/codebook.json")
QUESTION_METADATA = Path("dataset_construction/question_metadata.json")
LAYOUT = """\
<root>/WorldValuesBench/{full,train,valid,test}/{split}_demographic_qa.tsv
<root>/WorldValuesBench/{full,train,valid,test}/{split}_value_qa.tsv
<root>/dataset_construction/codebook.json
<root>/dataset_construction/question_metadata.json"""


def input_files(root: str | Path) -> list[Path]:
  """Every file a reader of the train, valid and test splits reads."""
  root = Path(root)
  splits = [path for split in ("train", "valid", "test") for path in split_files(root, split)]
  return [root / CODEBOOK, root / QUESTION_METADATA, *splits]


def split_files(root: str | Path, split: str) -> tuple[Path, Path]:
  """Paths of a split's (demographic, value) TSVs."""
  directory = Path(root) / "WorldValuesBench" / split
  return (directory / f"{split}_demographic_qa.tsv", directory / f"{split}_value_qa.tsv")


@dataclasses.dataclass(frozen=True)
class Question:
  """A value question as the model sees it: options are the codebook's codes >= 0, ascending."""

  question_id: str
  text: str
  option_codes: tuple[int, ...]
  option_texts: tuple[str, ...]
  scale_min: int | None = None
  scale_max: int | None = None

  @functools.cached_property
  def user(self) -> str:
    """The user turn asking this question."""
    return prompts.user_prompt(self.text, self.option_texts)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class SkipCounts:
  """What a pass over a split kept and why it skipped the rest."""

  examples: int = 0
  missing_answer: int = 0  # empty cell: the participant gave no valid answer (expected, frequent)
  negative_answer: int = 0  # WVS missing-value code (< 0) left in the file
  non_numeric_answer: int = 0  # text in a value cell (WVB's non-ordinal questions)
  answer_not_in_options: int = 0  # integer code that is not one of the question's choices
  # Participants with valid answers but no demographic row (or, with DROP, an empty profile
  # field), and the valid answers dropped with them.
  participants_missing_profile: int = 0
  examples_missing_profile: int = 0
  # With AS_NAN: participants with an empty profile field, and their examples (kept).
  participants_nan_profile: int = 0
  examples_nan_profile: int = 0
  # Rows of either TSV that are blank, have another cell count than the header, or whose
  # participant id is not an integer.
  malformed_rows: int = 0
  # Rows of either TSV whose participant id an earlier row of the file has (the first is kept).
  duplicate_rows: int = 0
  skipped_questions: list[str] = dataclasses.field(default_factory=list)  # unusable columns

  @property
  def skipped_examples(self) -> int:
    """Cells that looked like answers but could not be used (empty cells excluded)."""
    return (
      self.negative_answer
      + self.non_numeric_answer
      + self.answer_not_in_options
      + self.examples_missing_profile
    )

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


class _Profile(NamedTuple):
  sentence: str
  fields: dict[str, str]
  incomplete: bool  # an empty field reads "nan" (AS_NAN)


def _parse_code(cell: str) -> int | None:
  """An answer code from a TSV cell ("3" or pandas' "3.0"); None for text."""
  try:
    return int(cell)
  except ValueError:
    pass
  try:
    value = float(cell)
  except ValueError:
    return None
  return int(value) if value.is_integer() else None


def _read_tsv(path: Path) -> Iterator[tuple[int, list[str]]]:
  """Yields (line number, cells) of the header, then of the rows, of a TSV written by pandas.

  The header is checked first: it must name every column once and include D_INTERVIEW.
  """
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.reader(f, delimiter="\t")
    header = next(reader, None)
    if header is None:
      raise ValueError(f"{path} is empty (no header row); see {DOCS}")
    for column, name in enumerate(header, 1):
      if not name.strip():
        raise ValueError(f"{path} line 1, column {column}: the header has an empty column name")
      if header.index(name) + 1 != column:
        raise ValueError(
          f"{path} line 1, columns {header.index(name) + 1} and {column}: the header names "
          f"{name!r} twice"
        )
    if ID_COLUMN not in header:
      raise ValueError(
        f"{path} line 1: the header has no {ID_COLUMN} column (it starts {header[:4]}); is this "
        f"a WorldValuesBench TSV? See {DOCS}"
      )
    yield reader.line_num, header
    for row in reader:
      yield reader.line_num, row


def _malformed(row: list[str], header: list[str]) -> str | None:
  """Why a row cannot be read safely (None if it can), naming the column when there is one."""
  if not row:
    return "blank line"
  if len(row) != len(header):
    return (
      f"{len(row)} cells where the header has {len(header)} (a missing or extra tab would "
      "shift values onto other columns)"
    )
  id_col = header.index(ID_COLUMN)
  try:
    int(row[id_col])
  except ValueError:
    return f"column {id_col + 1} ({ID_COLUMN}): participant id {row[id_col]!r} is not an integer"
  return None


def _rows(path: Path, counts: SkipCounts) -> Iterator[list[str]]:
  """The header, then the well-formed rows, of a WVB TSV; malformed ones are counted, and so
  are the repeats of a participant id (its first row is kept)."""
  lines = _read_tsv(path)
  _, header = next(lines)
  yield header
  id_col = header.index(ID_COLUMN)
  first_line: dict[int, int] = {}
  for line, row in lines:
    problem = _malformed(row, header)
    if problem is None:
      participant = int(row[id_col])
      first = first_line.setdefault(participant, line)
      if first == line:
        yield row
        continue
      counts.duplicate_rows += 1
      problem = f"participant {participant} repeats line {first}; the first row is kept"
      if counts.duplicate_rows <= LOGGED_MALFORMED_ROWS:
        logger.warning("%s line %d: %s, this one skipped", path, line, problem)
      continue
    counts.malformed_rows += 1
    if counts.malformed_rows <= LOGGED_MALFORMED_ROWS:
      logger.warning("%s line %d: %s; row skipped", path, line, problem)


def _scale(value: Any) -> int | None:
  """question_metadata's answer_scale_min/max: an int, or "" for non-ordinal questions."""
  return None if value in ("", None) else int(value)


class WvbReader:
  """Reads a WVB manual directory; every missing piece is an error that names its path."""

  def __init__(self, root: str | Path):
    self.root = Path(root)
    if not self.root.is_dir():
      raise FileNotFoundError(
        f"WorldValuesBench manual directory {self.root} does not exist. Build it with "
        f"WorldValuesBench's dataset_construction/data_preparation.py ({DOCS} in this "
        f"repository says how); expected layout:\n{LAYOUT}"
      )
    self.codebook = self._load_json(CODEBOOK)
    self.question_metadata = self._load_json(QUESTION_METADATA)

  def _load_json(self, relative: Path) -> dict[str, Any]:
    path = self.root / relative
    if not path.is_file():
      raise FileNotFoundError(f"missing {path} (expected layout:\n{LAYOUT})")
    with open(path, encoding="utf-8") as f:
      return json.load(f)

  def check_disjoint(self, splits: Sequence[str]) -> None:
    """Refuses splits that share a participant, naming the files, the lines and the ids: the
    protocol scores participants the model has not seen (docs/data.md)."""
    seen: dict[int, tuple[Path, int]] = {}  # participant -> (value file, line) of its first row
    for split in splits:
      _, value_path = self._files(split)
      lines = _read_tsv(value_path)
      _, header = next(lines)
      id_col = header.index(ID_COLUMN)
      shared = []
      for line, row in lines:
        if _malformed(row, header) is None:
          participant = int(row[id_col])
          path, first = seen.setdefault(participant, (value_path, line))
          if path != value_path:
            shared.append(f"{participant} (line {line}, and {path} line {first})")
      if shared:
        raise ValueError(
          f"{value_path} shares {len(shared)} participants with an earlier split: "
          f"{', '.join(shared[:5])}{' ...' if len(shared) > 5 else ''}; the splits must be "
          f"participant-disjoint ({DOCS}): keep each participant in one split"
        )

  def _files(self, split: str) -> tuple[Path, Path]:
    files = split_files(self.root, split)
    for path in files:
      if not path.is_file():
        raise FileNotFoundError(f"split {split!r}: missing {path} (expected layout:\n{LAYOUT})")
    return files

  def question(self, question_id: str) -> Question | None:
    """The question's prompt data, or None if the codebook cannot letter its options."""
    entry = self.codebook.get(question_id)
    if not entry or not entry.get("question"):
      return None
    coded = ((_parse_code(code), text) for code, text in entry.get("choices", {}).items())
    choices = sorted((code, text) for code, text in coded if code is not None and code >= 0)
    if not 1 <= len(choices) <= prompts.MAX_OPTIONS:
      return None
    scale = self.question_metadata.get(question_id, {})
    return Question(
      question_id=question_id,
      text=entry["question"],
      option_codes=tuple(code for code, _ in choices),
      option_texts=tuple(text for _, text in choices),
      scale_min=_scale(scale.get("answer_scale_min")),
      scale_max=_scale(scale.get("answer_scale_max")),
    )

  def questions(self, split: str) -> list[Question]:
    """The split's usable value questions, in column order."""
    _, value_path = self._files(split)
    _, header = next(_read_tsv(value_path))
    found = (self.question(qid) for qid in header if qid != ID_COLUMN)
    return [q for q in found if q is not None]

  def _profiles(
    self, path: Path, counts: SkipCounts, incomplete_profiles: str
  ) -> dict[str, _Profile | None]:
    """participant id -> profile; None for a dropped one (an empty field, with DROP)."""
    rows = _rows(path, counts)
    header = next(rows)
    try:
      id_col = header.index(ID_COLUMN)
      columns = {
        field: header.index(column) for field, column in prompts.WVB_PROFILE_COLUMNS.items()
      }
    except ValueError as e:
      raise ValueError(f"{path} lacks a required column: {e}") from None
    profiles: dict[str, _Profile | None] = {}
    for row in rows:
      values = {field: row[col].strip() for field, col in columns.items()}
      incomplete = not all(values.values())
      if incomplete and incomplete_profiles == DROP:
        profiles[row[id_col].strip()] = None
        continue
      values = {field: value or AS_NAN for field, value in values.items()}
      values["age_group"] = prompts.age_group_text(values["age_group"])
      profiles[row[id_col].strip()] = _Profile(prompts.profile_sentence(values), values, incomplete)
    return profiles

  def examples(
    self, split: str, counts: SkipCounts | None = None, incomplete_profiles: str = DROP
  ) -> Iterator[dict[str, Any]]:
    """Yields the split's examples as raw-text dicts (the TFDS feature layout).

    `counts` is filled in as the iterator advances; a split without a single valid example
    raises ValueError once exhausted. `incomplete_profiles` (DROP or AS_NAN) says what becomes
    of a participant with an empty profile field.
    """
    if incomplete_profiles not in INCOMPLETE_PROFILES:
      raise ValueError(
        f"incomplete_profiles={incomplete_profiles!r}; must be one of {INCOMPLETE_PROFILES}"
      )
    counts = SkipCounts() if counts is None else counts
    demographic_path, value_path = self._files(split)
    profiles = self._profiles(demographic_path, counts, incomplete_profiles)
    rows = _rows(value_path, counts)
    header = next(rows)
    id_col = header.index(ID_COLUMN)
    columns = []
    for col, qid in enumerate(header):
      if col == id_col:
        continue
      question = self.question(qid)
      if question is None:
        counts.skipped_questions.append(qid)
      else:
        columns.append((col, question, {c: i for i, c in enumerate(question.option_codes)}))

    for row in rows:
      participant = row[id_col].strip()
      profile = profiles.get(participant)
      counted_participant = False
      for col, question, option_of_code in columns:
        cell = row[col].strip()
        if not cell:
          counts.missing_answer += 1
          continue
        code = _parse_code(cell)
        if code is None:
          counts.non_numeric_answer += 1
          continue
        if code < 0:
          counts.negative_answer += 1
          continue
        option = option_of_code.get(code)
        if option is None:
          counts.answer_not_in_options += 1
          continue
        if profile is None:
          counts.examples_missing_profile += 1
          if not counted_participant:
            counts.participants_missing_profile += 1
            counted_participant = True
          continue
        if profile.incomplete:
          counts.examples_nan_profile += 1
          if not counted_participant:
            counts.participants_nan_profile += 1
            counted_participant = True
        counts.examples += 1
        yield {
          "question_id": question.question_id,
          "participant_id": int(participant),
          "user": question.user,
          "profile": profile.sentence,
          "demographics": dict(profile.fields),
          "answer_letter": prompts.LETTERS[option],
          "answer_option": option,
          "answer_code": code,
          "option_codes": list(question.option_codes),
          "num_options": len(question.option_codes),
        }
    _report(self.root, split, counts)


def _report(root: Path, split: str, counts: SkipCounts) -> None:
  if counts.examples == 0:
    raise ValueError(
      f"split {split!r} of {root} has no valid (participant, value question) rows: "
      f"{counts.as_dict()}"
    )
  logger.info(
    "WVB %s split %r: %d examples; skip counts %s", root, split, counts.examples, counts.as_dict()
  )
  if counts.skipped_examples or counts.skipped_questions or counts.malformed_rows:
    logger.warning(
      "WVB split %r: skipped %d malformed rows, %d answer cells (negative %d, non-numeric %d, "
      "not an option %d, missing profile %d from %d participants) and %d question columns %s",
      split,
      counts.malformed_rows,
      counts.skipped_examples,
      counts.negative_answer,
      counts.non_numeric_answer,
      counts.answer_not_in_options,
      counts.examples_missing_profile,
      counts.participants_missing_profile,
      len(counts.skipped_questions),
      counts.skipped_questions[:10],
    )
  if counts.participants_nan_profile:
    logger.warning(
      "WVB split %r: kept %d examples of %d participants with an empty profile field, which "
      "reads 'nan'",
      split,
      counts.examples_nan_profile,
      counts.participants_nan_profile,
    )


def _write_tsv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
  columns = list(rows[0])
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f, delimiter="\t", lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
      writer.writerow("" if row[c] is None else row[c] for c in columns)


def write_wvb_tree(
  root: str | Path,
  codebook: Mapping[str, Any],
  question_metadata: Mapping[str, Any],
  splits: Mapping[str, tuple[Sequence[Mapping[str, Any]], Sequence[Mapping[str, Any]]]],
) -> Path:
  """Writes a manual directory in WVB's layout.

  `splits` maps a split name to (demographic rows, value rows); each row is a dict whose keys
  (the first row's, in order) are the TSV columns, starting with D_INTERVIEW; None is an
  empty cell.
  """
  root = Path(root)
  (root / CODEBOOK).parent.mkdir(parents=True, exist_ok=True)
  for path, content in ((CODEBOOK, codebook), (QUESTION_METADATA, question_metadata)):
    (root / path).write_text(json.dumps(content, indent=4, ensure_ascii=False), encoding="utf-8")
  for split, (demographic_rows, value_rows) in splits.items():
    demographic_path, value_path = split_files(root, split)
    demographic_path.parent.mkdir(parents=True, exist_ok=True)
    _write_tsv(demographic_path, demographic_rows)
    _write_tsv(value_path, value_rows)
  return root
