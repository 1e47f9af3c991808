"""A small hand-written Community Alignment (CA) and PRISM manual directory, for tests.

The real sets are hub downloads; this fixture reproduces their columns and the kinds of bad
rows the processing must skip. What it holds is fixed, so tests can state expected records and
skip counts literally. `layout` picks the files written (`LAYOUTS`): "jsonl" (the default),
"parquet", "csv" (CA as CSV; PRISM, which has no CSV form, as JSON Lines) or "saved" (the
`save_to_disk` layout: CA in two Arrow IPC stream shards, PRISM conversations as a stream and
the survey as an IPC file). Every layout holds the same rows and yields the same records.

CA, one row per conversation (turns 1..4; "-" an empty turn; profile as the record shows it):
ca-001  Age: 25-34, Gender: Female, Country: India, Political: Moderate, Ethnicity: South Asian,
        Education: Bachelor's degree
        t1 response_b; t2 response_a; t3 no prompt; t4 -      SFT 2, DPO 3+3, accuracy answer 1
ca-002  Age: 45-54, Gender: Male, Country: Brazil, Education: High school   (Political "",
        Ethnicity whitespace)
        t1 response_d, candidate c empty                      SFT 1, DPO 2, no accuracy row
ca-003  Age: 18-24, Gender: Non-binary, Country: Germany, Political: Liberal, Ethnicity: White,
        Education: Master's degree
        t1 response_c; t2 no preference; t3 complete (dropped) SFT 1, DPO 3, accuracy answer 2
ca-004  Age: 35-44, Gender: Female, Country: Kenya, Political: Conservative, Ethnicity: Black,
        Education: Doctorate
        t1 response_a without text; t2 complete (dropped)     nothing
ca-005  Age: 55-64, Gender: Male, Country: Japan, Political: Moderate, Ethnicity: East Asian,
        Education: Bachelor's degree
        t1 preference "both"                                   nothing
ca-006  (every field empty: "You are a helpful assistant.")
        t1 response_a                                          SFT 1, DPO 3, accuracy answer 0
ca-006  again (a duplicate row)                                nothing
=> SFT 5, DPO 14, accuracy rows 3; skips: ca: turn without a prompt 1, ca: turn without a
   preferred response 1, ca: unparsable preferred response 1, ca: preferred response without
   text 1, ca: turn after an unusable turn 2, ca: empty rejected reply (no pair) 1, ca:
   duplicate conversation id 1, ca_eval: first turn missing a response 2, ca_eval: first turn
   without a valid preference 1.

PRISM survey (user1, user2; user3 has no row):
user1  Country: United Kingdom, Age: 25-34 years old, Gender: Female, Education: University
       Bachelors Degree, Religion: Christian, Ethnicity: White, Employment: Working full-time
user2  Country: Mexico, Age: 45-54 years old, Gender: Male, Employment: Retired
       (Education "", Religion "Prefer not to say", Ethnicity "other": all left out)
PRISM conversations (turn: replies, * the chosen one):
prism-1  user1  0: *shepherd's pie, pasta, pizza; 1: lentil curry, *lasagne   SFT 1, DPO 2+1
prism-2  user1  0: *no live weather, "Probably", "" (empty)                   SFT 1, DPO 1
prism-3  user2  0: *start early, lottery; 1: no chosen reply; 2: *welcome      SFT 1 (turn 0), DPO 1
prism-4  user3  0: *chicken joke, "No."  (profile "")                         SFT 1, DPO 1
=> SFT 4, DPO 6; skips: prism: conversation whose user has no survey row 1, prism: empty
   rejected reply (no pair) 1, prism: turn without a chosen reply 1, prism: turn after an
   unusable turn 1.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc as pa_ipc
import pyarrow.parquet as pq

from cuma_jax.data import preference_sources as ps

LAYOUTS = ("jsonl", "parquet", "csv", "saved")

# (conversation id, profile values in CA_PROFILE order, turns: (prompt, (a, b, c, d), preference)).
_CA = (
  (
    "ca-001",
    ("25-34", "Female", "India", "Moderate", "South Asian", "Bachelor's degree"),
    (
      (
        "How do I cook rice?",
        ("Boil it.", "Rinse it, then simmer it for 15 minutes.", "Use a rice cooker.", "Fry it."),
        "response_b",
      ),
      (
        "And for biryani?",
        ("Layer the rice with the meat.", "Use basmati.", "Add saffron.", "Order takeout."),
        "response_a",
      ),
      (None, ("x1", "x2", "x3", "x4"), "response_c"),
    ),
  ),
  (
    "ca-002",
    ("45-54", "Male", "Brazil", "", "   ", "High school"),
    (
      (
        "Is coffee healthy?",
        ("In moderation, yes.", "No.", None, "It depends on you."),
        "response_d",
      ),
    ),
  ),
  (
    "ca-003",
    ("18-24", "Non-binary", "Germany", "Liberal", "White", "Master's degree"),
    (
      ("Recommend a book.", ("Dune.", "Faust.", "Momo.", "Siddhartha."), "response_c"),
      (
        "Something shorter?",
        ("The Little Prince.", "Candide.", "Animal Farm.", "The Metamorphosis."),
        None,
      ),
      ("Thanks!", ("You're welcome.", "Enjoy!", "Anytime.", "Bye."), "response_a"),
    ),
  ),
  (
    "ca-004",
    ("35-44", "Female", "Kenya", "Conservative", "Black", "Doctorate"),
    (
      ("What should I name my cat?", (None, "Whiskers.", "Luna.", "Mochi."), "response_a"),
      ("Any more ideas?", ("Tiger.", "Simba.", "Pixel.", "Nala."), "response_b"),
    ),
  ),
  (
    "ca-005",
    ("55-64", "Male", "Japan", "Moderate", "East Asian", "Bachelor's degree"),
    (
      (
        "When should I visit Kyoto?",
        ("In spring.", "In autumn.", "In winter.", "Any time."),
        "both",
      ),
    ),
  ),
  (
    "ca-006",
    (None,) * 6,
    (
      (
        "Translate 'thank you' into Spanish.",
        ("¡Gracias!", "De nada.", "Por favor.", "Hola."),
        "response_a",
      ),
    ),
  ),
  (
    "ca-006",
    ("65+", "Male", "Spain", "Liberal", "White", "Doctorate"),
    (("Duplicate?", ("Yes.", "No.", "Maybe.", "Perhaps."), "response_b"),),
  ),
)

_SURVEY = (
  {
    "user_id": "user1",
    "age": "25-34 years old",
    "gender": "Female",
    "education": "University Bachelors Degree",
    "employment_status": "Working full-time",
    "location": {"birth_country": "Ireland", "reside_country": "United Kingdom"},
    "religion": {"self_described": "Catholic", "simplified": "Christian"},
    "ethnicity": {"self_described": "Irish", "simplified": "White"},
  },
  {
    "user_id": "user2",
    "age": "45-54 years old",
    "gender": "Male",
    "education": "",
    "employment_status": "Retired",
    "location": {"birth_country": "Mexico", "reside_country": "Mexico"},
    "religion": {"self_described": None, "simplified": "Prefer not to say"},
    "ethnicity": {"self_described": "Mestizo", "simplified": "other"},
  },
)

# (conversation id, user id, {turn: (user message, [(reply, chosen)])}).
_PRISM = (
  (
    "prism-1",
    "user1",
    {
      0: (
        "What should I cook tonight?",
        [("Try a shepherd's pie.", True), ("Cook pasta.", False), ("Order pizza.", False)],
      ),
      1: (
        "Something vegetarian?",
        [("A lentil curry.", False), ("A vegetable lasagne.", True)],
      ),
    },
  ),
  (
    "prism-2",
    "user1",
    {
      0: (
        "Is it going to rain in London?",
        [("I can't check live weather.", True), ("Probably, it's London.", False), ("", False)],
      ),
    },
  ),
  (
    "prism-3",
    "user2",
    {
      0: (
        "How do I save for retirement?",
        [("Start early and diversify.", True), ("Buy lottery tickets.", False)],
      ),
      1: ("Is gold a good idea?", [("Maybe.", False), ("Only as a small share.", False)]),
      2: ("Thanks.", [("You're welcome.", True)]),
    },
  ),
  (
    "prism-4",
    "user3",
    {0: ("Tell me a joke.", [("Why did the chicken cross the road?", True), ("No.", False)])},
  ),
)


def community_alignment_rows() -> list[dict[str, Any]]:
  """The CA rows, as the hub's columns (every turn column present; None when empty)."""
  rows = []
  for conversation_id, profile, turns in _CA:
    row: dict[str, Any] = {"conversation_id": conversation_id}
    row.update((column, value) for (_, column), value in zip(ps.CA_PROFILE, profile, strict=True))
    for index, turn in enumerate(ps.CA_TURNS):
      prompt, candidates, preference = (
        turns[index] if index < len(turns) else (None, (None,) * 4, None)
      )
      row[f"{turn}_turn_prompt"] = prompt
      for letter, text in zip(ps.CA_CANDIDATES, candidates, strict=True):
        row[f"{turn}_turn_response_{letter}"] = text
      row[f"{turn}_turn_preferred_response"] = preference
    rows.append(row)
  return rows


def prism_rows() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """The PRISM (conversation rows, survey rows); the survey nests its objects, as the hub does."""
  conversations = []
  for conversation_id, user_id, turns in _PRISM:
    history = []
    for turn, (message, replies) in turns.items():
      history.append(
        {"turn": turn, "role": "user", "content": message, "if_chosen": False, "model_name": None}
      )
      history += [
        {"turn": turn, "role": "model", "content": text, "if_chosen": chosen, "model_name": "m"}
        for text, chosen in replies
      ]
    conversations.append(
      {
        "conversation_id": conversation_id,
        "user_id": user_id,
        "conversation_type": "unguided",
        "conversation_history": history,
      }
    )
  return conversations, [dict(row) for row in _SURVEY]


def _flat(row: dict[str, Any]) -> dict[str, Any]:
  """A survey row with its objects as dotted columns (`location.reside_country`)."""
  flat: dict[str, Any] = {}
  for key, value in row.items():
    if isinstance(value, dict):
      flat.update((f"{key}.{child}", v) for child, v in value.items())
    else:
      flat[key] = value
  return flat


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), "utf-8")


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def _write_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  pq.write_table(pa.Table.from_pylist(rows), path)


def _write_ipc(path: Path, rows: list[dict[str, Any]], stream: bool = True) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  table = pa.Table.from_pylist(rows)
  writer = pa_ipc.new_stream if stream else pa_ipc.new_file
  with writer(str(path), table.schema) as w:
    w.write_table(table)


def write_preference_fixture(root: str | Path, layout: str = "jsonl") -> Path:
  """Writes the fixture (module docstring) under `root` in `layout`; returns `root`."""
  if layout not in LAYOUTS:
    raise ValueError(f"unknown fixture layout {layout!r}; expected one of {LAYOUTS}")
  root = Path(root)
  ca = community_alignment_rows()
  conversations, survey = prism_rows()
  if layout == "saved":
    ca_dir = root / "facebook/community-alignment-dataset/benchmark/filtered"
    _write_ipc(ca_dir / "data-00000-of-00002.arrow", ca[:4])
    _write_ipc(ca_dir / "data-00001-of-00002.arrow", ca[4:])
    prism_dir = root / "HannahRoseKirk/prism-alignment"
    _write_ipc(prism_dir / "conversations/train/data-00000-of-00001.arrow", conversations)
    _write_ipc(prism_dir / "survey/train/data-00000-of-00001.arrow", survey, stream=False)
  elif layout == "parquet":
    _write_parquet(root / "community_alignment/filtered.parquet", ca)
    _write_parquet(root / "prism/conversations.parquet", conversations)
    _write_parquet(root / "prism/survey.parquet", [_flat(row) for row in survey])
  else:
    write_ca = _write_csv if layout == "csv" else _write_jsonl
    write_ca(root / f"community_alignment/filtered.{layout}", ca)
    _write_jsonl(root / "prism/conversations.jsonl", conversations)
    _write_jsonl(root / "prism/survey.jsonl", survey)
  return root
