"""Community Alignment (CA) and PRISM manual directories: read them into preference records.

Layout (each piece is the hub split, downloaded in one of these forms; the first form that
exists, in this order, is read):

    <root>/community_alignment/filtered.{parquet,jsonl,csv}       CA, one row per conversation
    <root>/facebook/community-alignment-dataset/benchmark/filtered/data-*.arrow
    <root>/prism/{conversations,survey}.{parquet,jsonl}            PRISM
    <root>/HannahRoseKirk/prism-alignment/{conversations,survey}/train/data-*.arrow

The `data-*.arrow` files are what `datasets.Dataset.save_to_disk` writes (Arrow IPC streams;
IPC files are read too), taken in name order. Everything is read with pyarrow. CSV cells are
all read as text: an unquoted empty cell is None, and "nan", "None" or "NA" stay text. JSON
Lines are typed over the whole file at once. PRISM's survey nests `location`, `religion` and
`ethnicity` as objects; they are flattened to `location.reside_country`-style names, which is
also the name a flat export gives them, and the processing accepts either form.

Processing turns raw rows into records (`RECORD_KEYS`; each record is one SFT row, one DPO
pair or one CA accuracy row):
- Profile: the non-empty fields, "Label: value", joined by ", " (`CA_PROFILE`,
  `PRISM_PROFILE`). Only None, "" and whitespace-only values are empty; "nan" or "None" are
  values. PRISM drops a Religion of "prefer not to say", "none" or "other" and an Ethnicity of
  "prefer not to say" or "other" (case-insensitively). Values are kept verbatim.
- System turn "User Profile: {profile}", or "You are a helpful assistant." for an empty one.
- Golden thread: the system turn, then each turn's prompt and CHOSEN reply. It stops at the
  first unusable turn (CA: no prompt, no or an unparsable preference, no chosen text; PRISM: no
  user message, no chosen reply or no chosen text); later turns are dropped.
- CA, per thread turn: one SFT row (thread up to and including the chosen reply) and one DPO
  pair per other non-empty candidate a..d, whose `k` numbers the pairs of that turn. PRISM:
  one SFT row per conversation (the whole thread; `turn` is its last turn) and one DPO pair per
  non-empty, non-chosen model reply of each thread turn. PRISM turns are numbered from the
  conversation's first turn number.
- CA accuracy rows: one per conversation whose first turn has a prompt, all four candidates and
  a valid preference; `answer` indexes the preferred candidate.

Nothing is dropped silently: every skip is counted in a `collections.Counter` under a short
reason ("ca: ...", "ca_eval: ...", "prism: ..."): a row without or with an already seen
conversation id, an unusable turn, each later turn with content, an empty rejected reply (no
pair), a PRISM conversation whose user has no survey row (kept, with the empty profile). An
entirely empty CA turn ends the conversation and is not a skip.

Splits (`split_records`), seeded, in one of `SPLIT_MODES`:
- "conversation" (default): the sorted conversation ids are split 90/10 (the test share is
  ceil(0.1 n) of a seeded permutation), and every row follows its conversation, so no
  conversation is in both; rows keep their input order. Training keeps a seeded sample of the
  train conversations (CA 10,000, PRISM 2,000; all of them if there are fewer). `ca_eval`
  holds the accuracy rows of test conversations only, shuffled, at most 1,000. The three
  draws come in that order from one `np.random.default_rng(seed)`.
- "reference": the released preprocessing. SFT and DPO rows are split 90/10 at row level,
  independently, as `datasets`' `train_test_split(test_size=0.1, seed=seed)` does (so a
  conversation may sit on both sides). CA: `random.seed(seed)` samples 10,000 of the sorted
  SFT-train conversation ids (the release samples from a set, whose order depends on string
  hashing), keeping their SFT-train and DPO-train rows. PRISM: SFT-train shuffled (`Dataset.shuffle(seed)`), its first
  2,000 rows, and the DPO-train rows of those conversations. Both: DPO-test keeps the rows
  whose conversation is in SFT-test. Fewer train conversations than the sample size are all
  kept (the release would fail).
  `ca_eval` = rows 10,000..10,999 of the shuffled accuracy rows (the release shuffles the raw
  split; the two agree when no CA row was skipped for its first turn). A smaller set yields
  what exists of that range, and an empty range is an error.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
import csv
import json
import logging
import math
from pathlib import Path
import random
from typing import Any, TypedDict

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.ipc as pa_ipc
import pyarrow.json as pa_json
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

CA = "community_alignment"
# Repeated conversation ids logged one by one per source; the rest are only counted.
LOGGED_DUPLICATES = 10
PRISM = "prism"
SYNTHETIC = "synthetic"
SOURCES = (CA, PRISM, SYNTHETIC)
SPLIT_MODES = ("conversation", "reference")
# Raised whenever a split's rows change, so that datasets prepared before are prepared anew
# (2: PRISM's reference DPO-test filtered to the SFT-test conversations).
SPLITS_REVISION = 2
# Every record has exactly these keys, in this order.
RECORD_KEYS = (
  "id",
  "source",
  "conversation_id",
  "turn",
  "profile",
  "profile_fields",
  "messages",
  "chosen",
  "rejected",
  "question",
  "options",
  "answer",
  "question_id",
  "chosen_option",
)
DEFAULT_SYSTEM = "You are a helpful assistant."
TEST_FRACTION = 0.1
# Conversations kept for training; a source missing here keeps them all.
TRAIN_CONVERSATIONS = {CA: 10_000, PRISM: 2_000}
CA_EVAL_ROWS = 1_000
# Rows of the shuffled CA accuracy rows that the released evaluation reads.
REFERENCE_CA_EVAL = (10_000, 11_000)

CA_TURNS = ("first", "second", "third", "fourth")
CA_CANDIDATES = ("a", "b", "c", "d")
# (label, column), in profile order.
CA_PROFILE = (
  ("Age", "annotator_age"),
  ("Gender", "annotator_gender"),
  ("Country", "annotator_country"),
  ("Political", "annotator_political"),
  ("Ethnicity", "annotator_ethnicity"),
  ("Education", "annotator_education_level"),
)
PRISM_PROFILE = (
  ("Country", "location.reside_country"),
  ("Age", "age"),
  ("Gender", "gender"),
  ("Education", "education"),
  ("Religion", "religion.simplified"),
  ("Ethnicity", "ethnicity.simplified"),
  ("Employment", "employment_status"),
)
# Lower-cased values that leave a PRISM field out of the profile.
PRISM_DROPPED = {
  "Religion": frozenset({"prefer not to say", "none", "other"}),
  "Ethnicity": frozenset({"prefer not to say", "other"}),
}
# The prefix of a source's reasons in skip counts.
_COUNTED_AS = {CA: "ca", PRISM: "prism"}
_PREFERENCES = {f"response_{c}": i for i, c in enumerate(CA_CANDIDATES)}

_CA_FILES = tuple(
  Path("community_alignment") / f"filtered.{ext}" for ext in ("parquet", "jsonl", "csv")
)
_CA_SAVED = Path("facebook/community-alignment-dataset/benchmark/filtered")
_PRISM_PARTS = ("conversations", "survey")
_PRISM_SAVED = Path("HannahRoseKirk/prism-alignment")


# Reading.


def _locate(root: Path, flat: Sequence[Path], saved: Path, what: str) -> list[Path]:
  for path in flat:
    if (root / path).is_file():
      return [root / path]
  shards = sorted((root / saved).glob("data-*.arrow"))
  if shards:
    return shards
  expected = "\n".join(f"  {root / path}" for path in flat)
  raise FileNotFoundError(
    f"no {what} under {root}; expected one of:\n{expected}\n  {root / saved}/data-*.arrow"
  )


def _prism_files(root: Path, part: str) -> list[Path]:
  flat = [Path("prism") / f"{part}.{ext}" for ext in ("parquet", "jsonl")]
  return _locate(root, flat, _PRISM_SAVED / part / "train", f"PRISM {part}")


def input_files(root: str | Path, source: str) -> list[Path]:
  """The files the reader of `source` (CA or PRISM) reads under `root`, in reading order."""
  root = Path(root)
  if source == CA:
    return _locate(root, _CA_FILES, _CA_SAVED, "Community Alignment data")
  if source == PRISM:
    return [path for part in _PRISM_PARTS for path in _prism_files(root, part)]
  raise ValueError(f"source {source!r} has no manual directory; expected {CA!r} or {PRISM!r}")


def _read_csv(path: Path) -> pa.Table:
  with open(path, newline="", encoding="utf-8-sig") as f:
    header = next(csv.reader(f), None)
  if not header:
    raise ValueError(f"{path} is empty (no header row)")
  return pa_csv.read_csv(
    path,
    parse_options=pa_csv.ParseOptions(newlines_in_values=True),
    convert_options=pa_csv.ConvertOptions(
      column_types={column: pa.string() for column in header},
      strings_can_be_null=True,
      null_values=[""],
      quoted_strings_can_be_null=False,
    ),
  )


def _read_ipc(path: Path) -> pa.Table:
  try:
    with pa.OSFile(str(path)) as f:
      return pa_ipc.open_stream(f).read_all()
  except pa.ArrowInvalid:
    with pa.OSFile(str(path)) as f:
      return pa_ipc.open_file(f).read_all()


def _read_table(path: Path) -> pa.Table:
  try:
    if path.suffix == ".parquet":
      return pq.read_table(path)
    if path.suffix == ".jsonl":
      # One block for the whole file: column types are inferred from every row, and no row
      # outgrows a block.
      block_size = min(max(path.stat().st_size + 1, 1 << 20), 2**31 - 1)
      return pa_json.read_json(path, read_options=pa_json.ReadOptions(block_size=block_size))
    if path.suffix == ".csv":
      return _read_csv(path)
    return _read_ipc(path)
  except pa.ArrowInvalid as e:
    raise ValueError(f"cannot read {path}: {e}") from e


def _read_rows(paths: Iterable[Path], flatten: bool = False) -> list[dict[str, Any]]:
  rows = []
  for path in paths:
    table = _read_table(path)
    rows.extend((table.flatten() if flatten else table).to_pylist())
  return rows


def read_community_alignment(root: str | Path) -> list[dict[str, Any]]:
  """CA's rows, as dicts of python values (None for nulls)."""
  return _read_rows(input_files(root, CA))


def read_prism(root: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """PRISM's (conversation rows, survey rows); survey objects flattened to dotted names."""
  root = Path(root)
  conversations = _read_rows(_prism_files(root, "conversations"))
  return conversations, _read_rows(_prism_files(root, "survey"), flatten=True)


# Records.


def make_record(source: str, conversation_id: str, turn: int, k: int = 0, **fields: Any) -> dict:
  """A record with every key of `RECORD_KEYS`: `fields` set some, the rest are empty."""
  record = {
    "id": f"{source}:{conversation_id}:{turn}:{k}",
    "source": source,
    "conversation_id": conversation_id,
    "turn": turn,
    "profile": "",
    "profile_fields": "{}",
    "messages": "[]",
    "chosen": "",
    "rejected": "",
    "question": "",
    "options": [],
    "answer": -1,
    "question_id": "",
    "chosen_option": -1,
  }
  unknown = set(fields) - set(record)
  if unknown:
    raise TypeError(f"unknown record fields {sorted(unknown)}; a record has {RECORD_KEYS}")
  record.update(fields)
  return record


def system_message(profile: str) -> dict[str, str]:
  """The system turn that carries the profile."""
  return {"role": "system", "content": f"User Profile: {profile}" if profile else DEFAULT_SYSTEM}


def _text(value: Any) -> str:
  """A cell as text; "" when it is None, empty or whitespace only."""
  if value is None:
    return ""
  text = value if isinstance(value, str) else str(value)
  return text if text.strip() else ""


class Profile(TypedDict):
  """A record's profile: its text (``label: value, ...``) and its fields as a JSON object."""

  profile: str
  profile_fields: str


def _profile(fields: Iterable[tuple[str, str]]) -> Profile:
  """`profile` and `profile_fields` of a record, from (label, value) pairs in profile order."""
  kept = {label: value for label, value in fields if value}
  return {
    "profile": ", ".join(f"{label}: {value}" for label, value in kept.items()),
    "profile_fields": json.dumps(kept, ensure_ascii=False),
  }


def ca_profile(row: Mapping[str, Any]) -> Profile:
  """`profile` and `profile_fields` of a CA row's annotator."""
  return _profile((label, _text(row.get(column))) for label, column in CA_PROFILE)


def _column(row: Mapping[str, Any], column: str) -> Any:
  """A survey cell under its dotted name, or nested (`location` -> `reside_country`)."""
  if column in row:
    return row[column]
  parent, _, child = column.partition(".")
  nested = row.get(parent) if child else None
  return nested.get(child) if isinstance(nested, Mapping) else None


def prism_profile(row: Mapping[str, Any]) -> Profile:
  """`profile` and `profile_fields` of a PRISM survey row."""

  def value(label: str, column: str) -> str:
    text = _text(_column(row, column))
    return "" if text.strip().lower() in PRISM_DROPPED.get(label, ()) else text

  return _profile((label, value(label, column)) for label, column in PRISM_PROFILE)


def _messages(messages: Sequence[Mapping[str, str]]) -> str:
  return json.dumps(list(messages), ensure_ascii=False)


def _pair(role: str, content: str) -> dict[str, str]:
  return {"role": role, "content": content}


def _pairs(
  source: str,
  conversation_id: str,
  turn: int,
  profile: Profile,
  prompt_messages: Sequence[Mapping[str, str]],
  chosen: str,
  others: Sequence[str],
  counts: Counter,
) -> list[dict]:
  """A turn's DPO records: one per non-empty rejected reply; empty ones are counted."""
  rejected = [text for text in others if text]
  if len(rejected) < len(others):
    counts[f"{_COUNTED_AS[source]}: empty rejected reply (no pair)"] += len(others) - len(rejected)
  messages = _messages(prompt_messages)
  return [
    make_record(
      source,
      conversation_id,
      turn,
      k,
      **profile,
      messages=messages,
      chosen=chosen,
      rejected=text,
    )
    for k, text in enumerate(rejected)
  ]


def _conversation_id(
  source: str, row: Mapping[str, Any], number: int, seen: dict[str, int], counts: Counter
) -> str | None:
  """The row's conversation id, or None (counted) when it is missing or seen before; a
  repeat (the first row is kept) is logged with both row numbers and the id."""
  conversation_id = _text(row.get("conversation_id"))
  if not conversation_id:
    counts[f"{_COUNTED_AS[source]}: row without a conversation id"] += 1
    return None
  first = seen.setdefault(conversation_id, number)
  if first != number:
    key = f"{_COUNTED_AS[source]}: duplicate conversation id"
    counts[key] += 1
    if counts[key] <= LOGGED_DUPLICATES:
      logger.warning(
        "%s row %d: conversation id %r repeats row %d; the first row is kept, this one skipped",
        source,
        number,
        conversation_id,
        first,
      )
    return None
  return conversation_id


def _ca_turn(row: Mapping[str, Any], turn: str) -> tuple[str, list[str], str, int | None]:
  """(prompt, candidates a..d, preference text, preferred index or None)."""
  preference = _text(row.get(f"{turn}_turn_preferred_response"))
  return (
    _text(row.get(f"{turn}_turn_prompt")),
    [_text(row.get(f"{turn}_turn_response_{c}")) for c in CA_CANDIDATES],
    preference,
    _PREFERENCES.get(preference.strip().lower()),
  )


def _ca_problem(prompt: str, candidates: list[str], preference: str, preferred: int | None) -> str:
  """Why a CA turn is unusable: "" for a usable turn, "end" for an entirely empty one."""
  if not prompt and not preference and not any(candidates):
    return "end"
  if not prompt:
    return "turn without a prompt"
  if not preference:
    return "turn without a preferred response"
  if preferred is None:
    return "unparsable preferred response"
  if not candidates[preferred]:
    return "preferred response without text"
  return ""


def community_alignment_records(
  rows: Iterable[Mapping[str, Any]], counts: Counter
) -> dict[str, list[dict]]:
  """CA's raw rows -> {"sft", "dpo", "ca"} records; skips are counted in `counts`."""
  out: dict[str, list[dict]] = {"sft": [], "dpo": [], "ca": []}
  seen: dict[str, int] = {}
  for number, row in enumerate(rows, 1):
    conversation_id = _conversation_id(CA, row, number, seen, counts)
    if conversation_id is None:
      continue
    profile = ca_profile(row)
    turns = [_ca_turn(row, turn) for turn in CA_TURNS]

    prompt, candidates, _, preferred = turns[0]
    if not prompt:
      counts["ca_eval: first turn without a prompt"] += 1
    elif not all(candidates):
      counts["ca_eval: first turn missing a response"] += 1
    elif preferred is None:
      counts["ca_eval: first turn without a valid preference"] += 1
    else:
      out["ca"].append(
        make_record(
          CA, conversation_id, 0, **profile, question=prompt, options=candidates, answer=preferred
        )
      )

    history = [system_message(profile["profile"])]
    stopped = False
    for index, (prompt, candidates, preference, preferred) in enumerate(turns):
      problem = _ca_problem(prompt, candidates, preference, preferred)
      if stopped:
        if problem != "end":
          counts["ca: turn after an unusable turn"] += 1
        continue
      if problem:
        stopped = True
        if problem != "end":
          counts[f"ca: {problem}"] += 1
        elif index == 0:
          counts["ca: conversation without a turn"] += 1
        continue
      assert preferred is not None, "_ca_problem passes only turns with a preferred response"
      chosen = candidates[preferred]
      prompt_messages = [*history, _pair("user", prompt)]
      out["sft"].append(
        make_record(
          CA,
          conversation_id,
          index,
          **profile,
          messages=_messages([*prompt_messages, _pair("assistant", chosen)]),
        )
      )
      others = [candidate for i, candidate in enumerate(candidates) if i != preferred]
      out["dpo"] += _pairs(
        CA, conversation_id, index, profile, prompt_messages, chosen, others, counts
      )
      history = [*prompt_messages, _pair("assistant", chosen)]
  return out


def _is_true(value: Any) -> bool:
  return str(value).strip().lower() in ("true", "1")


def prism_records(
  conversations: Iterable[Mapping[str, Any]],
  survey: Iterable[Mapping[str, Any]],
  counts: Counter,
) -> dict[str, list[dict]]:
  """PRISM's raw conversation and survey rows -> {"sft", "dpo"} records; skips are counted."""
  profiles = {}
  for row in survey:
    user = _text(row.get("user_id"))
    if not user:
      counts["prism: survey row without a user id"] += 1
    elif user in profiles:
      counts["prism: duplicate survey row"] += 1
    else:
      profiles[user] = prism_profile(row)

  out: dict[str, list[dict]] = {"sft": [], "dpo": []}
  seen: dict[str, int] = {}
  for number, row in enumerate(conversations, 1):
    conversation_id = _conversation_id(PRISM, row, number, seen, counts)
    if conversation_id is None:
      continue
    profile = profiles.get(_text(row.get("user_id")))
    if profile is None:
      counts["prism: conversation whose user has no survey row"] += 1
      profile = _profile(())
    by_turn = defaultdict(list)
    for entry in row.get("conversation_history") or ():
      try:
        by_turn[int(entry["turn"])].append(entry)
      except (KeyError, TypeError, ValueError):
        counts["prism: history entry without a turn number"] += 1
    if not by_turn:
      counts["prism: conversation without turns"] += 1
      continue

    history = [system_message(profile["profile"])]
    thread = []  # the thread's turn indices
    stopped = False
    for index, number in enumerate(range(min(by_turn), max(by_turn) + 1)):
      entries = by_turn.get(number, [])
      if stopped:
        if entries:
          counts["prism: turn after an unusable turn"] += 1
        continue
      users = [e for e in entries if e.get("role") == "user"]
      replies = [e for e in entries if e.get("role") == "model"]
      chosen = [e for e in replies if _is_true(e.get("if_chosen"))]
      prompt = _text(users[0].get("content")) if users else ""
      reply = _text(chosen[0].get("content")) if chosen else ""
      for problem, missing in (
        ("turn without a user message", not prompt),
        ("turn without a chosen reply", not chosen),
        ("chosen reply without text", not reply),
      ):
        if missing:
          counts[f"prism: {problem}"] += 1
          stopped = True
          break
      if stopped:
        continue
      if len(users) + len(replies) < len(entries):
        counts["prism: history entry with an unknown role"] += 1
      if len(users) > 1:
        counts["prism: turn with several user messages (the first is the prompt)"] += 1
      if len(chosen) > 1:
        counts["prism: turn with several chosen replies (the first is chosen)"] += 1
      prompt_messages = [*history, _pair("user", prompt)]
      others = [_text(e.get("content")) for e in replies if not _is_true(e.get("if_chosen"))]
      out["dpo"] += _pairs(
        PRISM, conversation_id, index, profile, prompt_messages, reply, others, counts
      )
      history = [*prompt_messages, _pair("assistant", reply)]
      thread.append(index)
    if thread:
      out["sft"].append(
        make_record(PRISM, conversation_id, thread[-1], **profile, messages=_messages(history))
      )
  return out


# Splits.


def _row_split(rows: Sequence[dict], seed: int) -> tuple[list[dict], list[dict]]:
  """`datasets`' train_test_split(test_size=0.1, seed=seed): (train, test), permuted order."""
  n_test = math.ceil(TEST_FRACTION * len(rows))
  permutation = np.random.default_rng(seed).permutation(len(rows))
  return [rows[i] for i in permutation[n_test:]], [rows[i] for i in permutation[:n_test]]


def _of(rows: Iterable[dict], conversations: set[str]) -> list[dict]:
  return [row for row in rows if row["conversation_id"] in conversations]


def _ids(rows: Iterable[dict]) -> set[str]:
  return {row["conversation_id"] for row in rows}


def _conversation_splits(
  records: Mapping[str, list[dict]], seed: int, train_conversations: int | None
) -> dict[str, list[dict]]:
  ids = sorted(set().union(*(_ids(rows) for rows in records.values())))
  rng = np.random.default_rng(seed)
  permutation = rng.permutation(len(ids))
  n_test = math.ceil(TEST_FRACTION * len(ids))
  test = {ids[i] for i in permutation[:n_test]}
  train_ids = [conversation for conversation in ids if conversation not in test]
  train = {train_ids[i] for i in rng.permutation(len(train_ids))[:train_conversations]}
  splits = {
    "sft_train": _of(records["sft"], train),
    "sft_test": _of(records["sft"], test),
    "dpo_train": _of(records["dpo"], train),
    "dpo_test": _of(records["dpo"], test),
  }
  if "ca" in records:
    candidates = _of(records["ca"], test)
    order = rng.permutation(len(candidates))[:CA_EVAL_ROWS]
    splits["ca_eval"] = [candidates[i] for i in order]
  return splits


def _reference_splits(
  records: Mapping[str, list[dict]], source: str, seed: int, train_conversations: int | None
) -> dict[str, list[dict]]:
  sft_train, sft_test = _row_split(records["sft"], seed)
  dpo_train, dpo_test = _row_split(records["dpo"], seed)
  if source == PRISM:
    order = np.random.default_rng(seed).permutation(len(sft_train))[:train_conversations]
    sft_train = [sft_train[i] for i in order]
    kept = _ids(sft_train)
  else:
    train_ids = sorted(_ids(sft_train))
    count = len(train_ids) if train_conversations is None else train_conversations
    kept = set(random.Random(seed).sample(train_ids, min(count, len(train_ids))))
    sft_train = _of(sft_train, kept)
  # Pairs of the SFT-test conversations only (the release filters both sources so).
  dpo_test = _of(dpo_test, _ids(sft_test))
  splits = {
    "sft_train": sft_train,
    "sft_test": sft_test,
    "dpo_train": _of(dpo_train, kept),
    "dpo_test": dpo_test,
  }
  if "ca" in records:
    start, stop = REFERENCE_CA_EVAL
    order = np.random.default_rng(seed).permutation(len(records["ca"]))[start:stop]
    if not len(order):
      raise ValueError(
        f"reference split: the CA accuracy set is rows {start}..{stop - 1} of the shuffled "
        f"accuracy rows, but there are only {len(records['ca'])}; use the "
        f"'conversation' split mode for a set this small"
      )
    splits["ca_eval"] = [records["ca"][i] for i in order]
  return splits


def split_records(
  records: Mapping[str, list[dict]],
  source: str,
  mode: str = "conversation",
  seed: int = 42,
  train_conversations: int | None = None,
) -> dict[str, list[dict]]:
  """Splits {"sft", "dpo"[, "ca"]} records into sft_train/test, dpo_train/test[, ca_eval].

  `mode` is one of `SPLIT_MODES` (module docstring). `train_conversations` caps the training
  conversations; None takes the source's `TRAIN_CONVERSATIONS` (all of them for a source
  without one).
  """
  if mode not in SPLIT_MODES:
    raise ValueError(f"unknown split mode {mode!r}; expected one of {SPLIT_MODES}")
  if source not in SOURCES:
    raise ValueError(f"unknown source {source!r}; expected one of {SOURCES}")
  if train_conversations is None:
    train_conversations = TRAIN_CONVERSATIONS.get(source)
  if mode == "reference":
    splits = _reference_splits(records, source, seed, train_conversations)
  else:
    splits = _conversation_splits(records, seed, train_conversations)
  _check_disjoint(splits, mode)
  return splits


def _check_disjoint(splits: Mapping[str, list[dict]], mode: str) -> None:
  """Refuses train and test splits that share what the split mode keeps apart: a
  conversation ("conversation"), or a row ("reference", which splits rows), naming the ids."""
  key = "conversation_id" if mode == "conversation" else "id"
  train = {name: {r[key] for r in rows} for name, rows in splits.items() if "train" in name}
  for name, rows in splits.items():
    if name in train:
      continue
    for other, ids in train.items():
      if mode == "reference" and other.split("_")[0] != name.split("_")[0]:
        continue  # the released splits draw SFT, DPO and CA rows independently
      shared = sorted({r[key] for r in rows} & ids)
      if shared:
        raise ValueError(
          f"{mode} split: {len(shared)} {key}s are in both {other} and {name} "
          f"({shared[:5]}); each must sit on one side"
        )
