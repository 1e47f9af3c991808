"""CA and PRISM reading, records and splits, on the hand-written fixture
(`cuma_jax.tiny.preference_fixture`), whose expected records are stated here literally."""

from collections import Counter
import json
import math
import random
import re

import numpy as np
import pyarrow as pa
import pytest

from cuma_jax.data import preference_sources as ps
from cuma_jax.tiny.preference_fixture import LAYOUTS, write_preference_fixture

CA1 = (
  "Age: 25-34, Gender: Female, Country: India, Political: Moderate, Ethnicity: South Asian, "
  "Education: Bachelor's degree"
)
CA2 = "Age: 45-54, Gender: Male, Country: Brazil, Education: High school"
CA3 = (
  "Age: 18-24, Gender: Non-binary, Country: Germany, Political: Liberal, Ethnicity: White, "
  "Education: Master's degree"
)
USER1 = (
  "Country: United Kingdom, Age: 25-34 years old, Gender: Female, Education: University "
  "Bachelors Degree, Religion: Christian, Ethnicity: White, Employment: Working full-time"
)
USER2 = "Country: Mexico, Age: 45-54 years old, Gender: Male, Employment: Retired"
RICE = "Rinse it, then simmer it for 15 minutes."
CA_COUNTS = {
  "ca: turn without a prompt": 1,
  "ca: turn without a preferred response": 1,
  "ca: unparsable preferred response": 1,
  "ca: preferred response without text": 1,
  "ca: turn after an unusable turn": 2,
  "ca: empty rejected reply (no pair)": 1,
  "ca: duplicate conversation id": 1,
  "ca_eval: first turn missing a response": 2,
  "ca_eval: first turn without a valid preference": 1,
}
PRISM_COUNTS = {
  "prism: conversation whose user has no survey row": 1,
  "prism: empty rejected reply (no pair)": 1,
  "prism: turn without a chosen reply": 1,
  "prism: turn after an unusable turn": 1,
}


def system(content):
  return {"role": "system", "content": content}


def user(content):
  return {"role": "user", "content": content}


def assistant(content):
  return {"role": "assistant", "content": content}


def read_all(root):
  counts = Counter()
  ca = ps.community_alignment_records(ps.read_community_alignment(root), counts)
  prism = ps.prism_records(*ps.read_prism(root), counts)
  return ca, prism, counts


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
  return {
    layout: write_preference_fixture(tmp_path_factory.mktemp(layout), layout) for layout in LAYOUTS
  }


@pytest.fixture(scope="module")
def fixture_records(roots):
  return read_all(roots["jsonl"])


def test_ca_sft_rows_follow_the_golden_thread(fixture_records):
  sft = fixture_records[0]["sft"]
  assert [(r["id"], r["conversation_id"], r["turn"], r["profile"]) for r in sft] == [
    ("community_alignment:ca-001:0:0", "ca-001", 0, CA1),
    ("community_alignment:ca-001:1:0", "ca-001", 1, CA1),
    ("community_alignment:ca-002:0:0", "ca-002", 0, CA2),
    ("community_alignment:ca-003:0:0", "ca-003", 0, CA3),
    ("community_alignment:ca-006:0:0", "ca-006", 0, ""),
  ]
  assert json.loads(sft[1]["messages"]) == [
    system(f"User Profile: {CA1}"),
    user("How do I cook rice?"),
    assistant(RICE),
    user("And for biryani?"),
    assistant("Layer the rice with the meat."),
  ]
  assert json.loads(sft[2]["messages"])[-1] == assistant("It depends on you.")
  assert json.loads(sft[3]["messages"])[-1] == assistant("Momo.")
  assert json.loads(sft[4]["messages"]) == [
    system("You are a helpful assistant."),
    user("Translate 'thank you' into Spanish."),
    assistant("¡Gracias!"),
  ]
  assert json.loads(sft[0]["profile_fields"]) == {
    "Age": "25-34",
    "Gender": "Female",
    "Country": "India",
    "Political": "Moderate",
    "Ethnicity": "South Asian",
    "Education": "Bachelor's degree",
  }
  assert list(json.loads(sft[2]["profile_fields"])) == ["Age", "Gender", "Country", "Education"]
  assert sft[4]["profile_fields"] == "{}"


def test_ca_dpo_pairs(fixture_records):
  dpo = fixture_records[0]["dpo"]
  assert [(r["id"], r["chosen"], r["rejected"]) for r in dpo] == [
    ("community_alignment:ca-001:0:0", RICE, "Boil it."),
    ("community_alignment:ca-001:0:1", RICE, "Use a rice cooker."),
    ("community_alignment:ca-001:0:2", RICE, "Fry it."),
    ("community_alignment:ca-001:1:0", "Layer the rice with the meat.", "Use basmati."),
    ("community_alignment:ca-001:1:1", "Layer the rice with the meat.", "Add saffron."),
    ("community_alignment:ca-001:1:2", "Layer the rice with the meat.", "Order takeout."),
    ("community_alignment:ca-002:0:0", "It depends on you.", "In moderation, yes."),
    ("community_alignment:ca-002:0:1", "It depends on you.", "No."),
    ("community_alignment:ca-003:0:0", "Momo.", "Dune."),
    ("community_alignment:ca-003:0:1", "Momo.", "Faust."),
    ("community_alignment:ca-003:0:2", "Momo.", "Siddhartha."),
    ("community_alignment:ca-006:0:0", "¡Gracias!", "De nada."),
    ("community_alignment:ca-006:0:1", "¡Gracias!", "Por favor."),
    ("community_alignment:ca-006:0:2", "¡Gracias!", "Hola."),
  ]
  # The prompt: system, earlier prompts and chosen replies, the final prompt; no reply.
  assert json.loads(dpo[4]["messages"]) == [
    system(f"User Profile: {CA1}"),
    user("How do I cook rice?"),
    assistant(RICE),
    user("And for biryani?"),
  ]
  assert json.loads(dpo[0]["messages"]) == [
    system(f"User Profile: {CA1}"),
    user("How do I cook rice?"),
  ]
  assert {r["profile"] for r in dpo[6:8]} == {CA2}


def test_ca_accuracy_rows(fixture_records):
  ca = fixture_records[0]["ca"]
  assert [(r["id"], r["question"], r["options"], r["answer"], r["profile"]) for r in ca] == [
    (
      "community_alignment:ca-001:0:0",
      "How do I cook rice?",
      ["Boil it.", RICE, "Use a rice cooker.", "Fry it."],
      1,
      CA1,
    ),
    (
      "community_alignment:ca-003:0:0",
      "Recommend a book.",
      ["Dune.", "Faust.", "Momo.", "Siddhartha."],
      2,
      CA3,
    ),
    (
      "community_alignment:ca-006:0:0",
      "Translate 'thank you' into Spanish.",
      ["¡Gracias!", "De nada.", "Por favor.", "Hola."],
      0,
      "",
    ),
  ]
  assert all(r["messages"] == "[]" and r["chosen"] == r["rejected"] == "" for r in ca)


def test_prism_records(fixture_records):
  sft, dpo = fixture_records[1]["sft"], fixture_records[1]["dpo"]
  assert set(fixture_records[1]) == {"sft", "dpo"}
  assert [(r["id"], r["profile"]) for r in sft] == [
    ("prism:prism-1:1:0", USER1),
    ("prism:prism-2:0:0", USER1),
    ("prism:prism-3:0:0", USER2),
    ("prism:prism-4:0:0", ""),
  ]
  assert json.loads(sft[0]["messages"]) == [
    system(f"User Profile: {USER1}"),
    user("What should I cook tonight?"),
    assistant("Try a shepherd's pie."),
    user("Something vegetarian?"),
    assistant("A vegetable lasagne."),
  ]
  # prism-3 stops at turn 1 (no chosen reply): turn 2 is dropped.
  assert json.loads(sft[2]["messages"]) == [
    system(f"User Profile: {USER2}"),
    user("How do I save for retirement?"),
    assistant("Start early and diversify."),
  ]
  assert json.loads(sft[3]["messages"])[0] == system("You are a helpful assistant.")
  assert [(r["id"], r["chosen"], r["rejected"]) for r in dpo] == [
    ("prism:prism-1:0:0", "Try a shepherd's pie.", "Cook pasta."),
    ("prism:prism-1:0:1", "Try a shepherd's pie.", "Order pizza."),
    ("prism:prism-1:1:0", "A vegetable lasagne.", "A lentil curry."),
    ("prism:prism-2:0:0", "I can't check live weather.", "Probably, it's London."),
    ("prism:prism-3:0:0", "Start early and diversify.", "Buy lottery tickets."),
    ("prism:prism-4:0:0", "Why did the chicken cross the road?", "No."),
  ]
  assert json.loads(dpo[2]["messages"]) == [
    system(f"User Profile: {USER1}"),
    user("What should I cook tonight?"),
    assistant("Try a shepherd's pie."),
    user("Something vegetarian?"),
  ]
  assert json.loads(sft[2]["profile_fields"]) == {
    "Country": "Mexico",
    "Age": "45-54 years old",
    "Gender": "Male",
    "Employment": "Retired",
  }


def test_skip_counts(fixture_records):
  assert dict(fixture_records[2]) == {**CA_COUNTS, **PRISM_COUNTS}


def test_every_record_has_every_key_with_its_type(fixture_records):
  records = [r for out in fixture_records[:2] for rows in out.values() for r in rows]
  types = dict(
    zip(
      ps.RECORD_KEYS,
      (str, str, str, int, str, str, str, str, str, str, list, int, str, int),
      strict=True,
    )
  )
  for record in records:
    assert tuple(record) == ps.RECORD_KEYS
    assert all(isinstance(record[k], t) for k, t in types.items()), record
    assert record["question_id"] == "" and record["chosen_option"] == -1
  sources = {r["source"] for r in records}
  assert sources == {"community_alignment", "prism"}
  by_table = [rows for out in fixture_records[:2] for rows in out.values()]
  assert all(len({r["id"] for r in rows}) == len(rows) for rows in by_table)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_reads_identically(roots, fixture_records, layout):
  assert read_all(roots[layout]) == fixture_records
  if layout != "csv":  # CSV cannot tell "" from a missing value; both are empty
    assert ps.read_community_alignment(roots[layout]) == ps.read_community_alignment(roots["jsonl"])
  assert ps.read_prism(roots[layout]) == ps.read_prism(roots["jsonl"])


def test_input_files(roots):
  jsonl, saved = roots["jsonl"], roots["saved"]
  assert ps.input_files(jsonl, ps.CA) == [jsonl / "community_alignment/filtered.jsonl"]
  assert ps.input_files(jsonl, ps.PRISM) == [
    jsonl / "prism/conversations.jsonl",
    jsonl / "prism/survey.jsonl",
  ]
  shards = saved / "facebook/community-alignment-dataset/benchmark/filtered"
  assert ps.input_files(saved, ps.CA) == [
    shards / "data-00000-of-00002.arrow",
    shards / "data-00001-of-00002.arrow",
  ]
  # The saved survey is an IPC file, not a stream: the reader's fallback read it.
  survey = saved / "HannahRoseKirk/prism-alignment/survey/train/data-00000-of-00001.arrow"
  assert ps.input_files(saved, ps.PRISM)[-1] == survey
  with pa.OSFile(str(survey)) as f, pytest.raises(pa.ArrowInvalid):
    pa.ipc.open_stream(f)
  with pytest.raises(ValueError, match="'synthetic' has no manual directory"):
    ps.input_files(jsonl, ps.SYNTHETIC)


def test_parquet_wins_over_jsonl(tmp_path, roots):
  root = write_preference_fixture(tmp_path, "jsonl")
  write_preference_fixture(tmp_path, "parquet")
  assert ps.input_files(root, ps.CA) == [root / "community_alignment/filtered.parquet"]
  assert [p.suffix for p in ps.input_files(root, ps.PRISM)] == [".parquet", ".parquet"]


def test_missing_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    ps.read_community_alignment(tmp_path)
  for path in (
    "community_alignment/filtered.parquet",
    "community_alignment/filtered.jsonl",
    "community_alignment/filtered.csv",
    "facebook/community-alignment-dataset/benchmark/filtered/data-*.arrow",
  ):
    assert str(tmp_path / path) in str(e.value)
  (tmp_path / "prism").mkdir()
  (tmp_path / "prism/conversations.jsonl").write_text('{"conversation_id": "c"}\n')
  with pytest.raises(FileNotFoundError, match="PRISM survey") as e:
    ps.read_prism(tmp_path)
  assert str(tmp_path / "prism/survey.jsonl") in str(e.value)
  assert str(tmp_path / "HannahRoseKirk/prism-alignment/survey/train/data-*.arrow") in str(e.value)


def test_unreadable_file_is_named(tmp_path):
  path = tmp_path / "community_alignment/filtered.parquet"
  path.parent.mkdir()
  path.write_bytes(b"not parquet")
  with pytest.raises(ValueError, match="filtered.parquet"):
    ps.read_community_alignment(tmp_path)


def test_csv_cells_are_text(tmp_path):
  path = tmp_path / "community_alignment/filtered.csv"
  path.parent.mkdir()
  path.write_text(
    'conversation_id,annotator_age,first_turn_prompt,annotator_gender\n007,nan,"a,\nb",\n',
    encoding="utf-8",
  )
  assert ps.read_community_alignment(tmp_path) == [
    {
      "conversation_id": "007",
      "annotator_age": "nan",
      "first_turn_prompt": "a,\nb",
      "annotator_gender": None,
    }
  ]


def test_profiles():
  nested = {
    "location": {"reside_country": "Chile"},
    "age": 30,
    "gender": " ",
    "religion": {"simplified": "NONE"},
    "ethnicity": {"simplified": "None"},
    "education": "nan",
    "employment_status": None,
  }
  dotted = {
    "location.reside_country": "Chile",
    "age": 30,
    "gender": " ",
    "religion.simplified": "NONE",
    "ethnicity.simplified": "None",
    "education": "nan",
  }
  # Religion "none" is dropped (any case); Ethnicity "None" is a value, as is "nan".
  expected = "Country: Chile, Age: 30, Education: nan, Ethnicity: None"
  assert ps.prism_profile(nested)["profile"] == ps.prism_profile(dotted)["profile"] == expected
  for religion in ("Prefer not to say", "other", "Other"):
    assert "Religion" not in ps.prism_profile({"religion.simplified": religion})["profile"]
  for ethnicity, kept in (("Prefer Not To Say", False), ("OTHER", False), ("None", True)):
    profile = ps.prism_profile({"ethnicity.simplified": ethnicity})["profile"]
    assert (profile == f"Ethnicity: {ethnicity}") is kept
  assert ps.prism_profile({})["profile"] == ""
  row = {f"annotator_{k}": k for k in ("education_level", "ethnicity", "political")}
  assert ps.ca_profile({**row, "annotator_country": "Peru", "annotator_age": "18-24"}) == {
    "profile": "Age: 18-24, Country: Peru, Political: political, Ethnicity: ethnicity, "
    "Education: education_level",
    "profile_fields": json.dumps(
      {
        "Age": "18-24",
        "Country": "Peru",
        "Political": "political",
        "Ethnicity": "ethnicity",
        "Education": "education_level",
      }
    ),
  }


def test_prism_turns_count_from_the_first_and_stop_at_a_gap():
  counts = Counter()
  entries = [
    (1, "user", "hi", False),
    (1, "model", "hello", True),
    (1, "model", "hey", False),
    (3, "user", "later", False),
    (3, "model", "ok", True),
  ]
  history = [dict(zip(("turn", "role", "content", "if_chosen"), e, strict=True)) for e in entries]
  row = {"conversation_id": 5, "user_id": "u", "conversation_history": history}
  out = ps.prism_records([row], [{"user_id": "u", "age": "30"}], counts)
  assert [(r["id"], r["profile"]) for r in out["sft"]] == [("prism:5:0:0", "Age: 30")]
  assert [r["id"] for r in out["dpo"]] == ["prism:5:0:0"]
  assert counts == {
    "prism: turn without a user message": 1,
    "prism: turn after an unusable turn": 1,
  }


def test_make_record_refuses_unknown_fields():
  assert ps.make_record("synthetic", "q1", 0, question_id="q1")["id"] == "synthetic:q1:0:0"
  with pytest.raises(TypeError, match="unknown record fields"):
    ps.make_record("synthetic", "q1", 0, prompt="x")


# Splits. The oracles below re-derive the selections with plain python and numpy.


def hf_split(n, seed):
  """Index lists (train, test) of `datasets`' train_test_split(test_size=0.1, seed=seed)."""
  n_test = -(-n // 10)
  permutation = np.random.default_rng(seed).permutation(n).tolist()
  return permutation[n_test:], permutation[:n_test]


def conversation_id(i):
  """Distinct ids whose sorted order is not their creation order."""
  return f"conv-{i * 2654435761 % 10**9:09d}"


def generated(n, source, ca=True):
  """n conversations with 1-3 SFT rows, 2 DPO rows per SFT row and one CA row each."""
  records = {"sft": [], "dpo": []}
  for i in range(n):
    cid = conversation_id(i)
    for turn in range(i % 3 + 1):
      records["sft"].append({"id": f"{source}:{cid}:{turn}:0", "conversation_id": cid})
      records["dpo"] += [
        {"id": f"{source}:{cid}:{turn}:{k}", "conversation_id": cid} for k in (0, 1)
      ]
  if ca:
    records["ca"] = [
      {"id": f"{source}:{conversation_id(i)}:0:0", "conversation_id": conversation_id(i)}
      for i in range(n)
    ]
  return records


def ids(rows):
  return [r["id"] for r in rows]


def test_reference_split_community_alignment():
  records = generated(11_500, ps.CA)
  got = ps.split_records(records, ps.CA, "reference")

  sft, dpo = records["sft"], records["dpo"]
  sft_train_idx, sft_test_idx = hf_split(len(sft), 42)
  dpo_train_idx, dpo_test_idx = hf_split(len(dpo), 42)
  sft_train = [sft[i] for i in sft_train_idx]
  sft_test = [sft[i] for i in sft_test_idx]
  state = random.getstate()
  random.seed(42)
  sampled = set(random.sample(sorted({r["conversation_id"] for r in sft_train}), 10000))
  random.setstate(state)
  test_conversations = {r["conversation_id"] for r in sft_test}
  shuffled_ca = [records["ca"][i] for i in np.random.default_rng(42).permutation(11_500)]
  assert ids(got["sft_train"]) == [r["id"] for r in sft_train if r["conversation_id"] in sampled]
  assert ids(got["sft_test"]) == ids(sft_test)
  assert ids(got["dpo_train"]) == [
    dpo[i]["id"] for i in dpo_train_idx if dpo[i]["conversation_id"] in sampled
  ]
  assert ids(got["dpo_test"]) == [
    dpo[i]["id"] for i in dpo_test_idx if dpo[i]["conversation_id"] in test_conversations
  ]
  assert ids(got["ca_eval"]) == ids(shuffled_ca[10000:11000])
  assert (
    len(got["ca_eval"]) == 1000 and len({r["conversation_id"] for r in got["sft_train"]}) == 10000
  )
  # Row-level splits leak: the reason the default is by conversation.
  assert {r["conversation_id"] for r in got["sft_train"]} & test_conversations


def test_reference_split_prism():
  records = generated(2_600, ps.PRISM, ca=False)
  got = ps.split_records(records, ps.PRISM, "reference")
  sft, dpo = records["sft"], records["dpo"]
  sft_train_idx, sft_test_idx = hf_split(len(sft), 42)
  dpo_train_idx, dpo_test_idx = hf_split(len(dpo), 42)
  sft_train = [sft[i] for i in sft_train_idx]
  first = [sft_train[i] for i in np.random.default_rng(42).permutation(len(sft_train))[:2000]]
  kept = {r["conversation_id"] for r in first}
  assert set(got) == {"sft_train", "sft_test", "dpo_train", "dpo_test"}
  assert ids(got["sft_train"]) == ids(first)
  assert ids(got["sft_test"]) == [sft[i]["id"] for i in sft_test_idx]
  assert ids(got["dpo_train"]) == [
    dpo[i]["id"] for i in dpo_train_idx if dpo[i]["conversation_id"] in kept
  ]
  test_conversations = {sft[i]["conversation_id"] for i in sft_test_idx}
  assert ids(got["dpo_test"]) == [
    dpo[i]["id"] for i in dpo_test_idx if dpo[i]["conversation_id"] in test_conversations
  ]
  # The released processing filters PRISM's DPO-test to the SFT-test conversations too:
  # without it, pairs of training conversations leak into the test split.
  assert {r["conversation_id"] for r in got["dpo_test"]} <= test_conversations
  assert len(got["dpo_test"]) < len(dpo_test_idx)


def test_reference_split_on_the_fixture(fixture_records):
  ca, prism, _ = fixture_records
  with pytest.raises(ValueError, match="rows 10000..10999 .* only 3"):
    ps.split_records(ca, ps.CA, "reference")
  got = ps.split_records(prism, ps.PRISM, "reference")
  train_idx, test_idx = hf_split(4, 42)
  assert ids(got["sft_test"]) == [prism["sft"][i]["id"] for i in test_idx]
  assert sorted(ids(got["sft_train"])) == sorted(prism["sft"][i]["id"] for i in train_idx)


@pytest.mark.parametrize("seed", [0, 42, 7])
def test_conversation_split_never_shares_a_conversation(seed):
  records = generated(3_000, ps.CA)
  got = ps.split_records(records, ps.CA, seed=seed, train_conversations=1_500)
  conversations = sorted({r["conversation_id"] for r in records["sft"]})
  n_test = math.ceil(0.1 * len(conversations))
  test = {conversations[i] for i in np.random.default_rng(seed).permutation(3000)[:n_test]}
  train = {r["conversation_id"] for split in ("sft_train", "dpo_train") for r in got[split]}
  assert not train & test
  assert {r["conversation_id"] for r in got["sft_test"]} == test
  assert ids(got["dpo_test"]) == [r["id"] for r in records["dpo"] if r["conversation_id"] in test]
  assert len({r["conversation_id"] for r in got["sft_train"]}) == 1_500
  assert {r["conversation_id"] for r in got["dpo_train"]} == {
    r["conversation_id"] for r in got["sft_train"]
  }
  assert sorted(ids(got["ca_eval"])) == sorted(
    r["id"] for r in records["ca"] if r["conversation_id"] in test
  )
  assert ids(got["ca_eval"]) != sorted(ids(got["ca_eval"]))  # shuffled
  assert got == ps.split_records(records, ps.CA, seed=seed, train_conversations=1_500)


def test_conversation_split_defaults():
  records = generated(12_000, ps.CA)
  got = ps.split_records(records, ps.CA)
  assert len({r["conversation_id"] for r in got["sft_train"]}) == 10_000
  assert len(got["ca_eval"]) == 1_000
  prism = ps.split_records(generated(2_500, ps.PRISM, ca=False), ps.PRISM)
  assert len({r["conversation_id"] for r in prism["sft_train"]}) == 2_000 and "ca_eval" not in prism
  small = ps.split_records(generated(30, ps.SYNTHETIC), ps.SYNTHETIC)
  assert len({r["conversation_id"] for r in small["sft_train"]}) == 27


def test_conversation_split_on_the_fixture(fixture_records):
  ca = fixture_records[0]
  got = ps.split_records(ca, ps.CA)
  conversations = ["ca-001", "ca-002", "ca-003", "ca-006"]
  test = conversations[np.random.default_rng(42).permutation(4)[0]]
  assert {r["conversation_id"] for r in got["sft_test"] + got["dpo_test"]} == {test}
  assert ids(got["ca_eval"]) == [r["id"] for r in ca["ca"] if r["conversation_id"] == test]
  assert len(got["sft_train"]) + len(got["sft_test"]) == 5
  assert len(got["dpo_train"]) + len(got["dpo_test"]) == 14


def test_repeated_ids_are_named_and_shared_ones_refused(roots, caplog):
  # The fixture repeats a CA conversation id: the first row is kept, the repeat named.
  read_all(roots["jsonl"])
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert any(
    re.fullmatch(
      r"community_alignment row (\d+): conversation id '[\w-]+' repeats row (\d+); the "
      r"first row is kept, this one skipped",
      m,
    )
    for m in warnings
  ), warnings
  # Rows repeated in the input would straddle a row-level split: refused, naming the ids.
  records = generated(200, ps.PRISM, ca=False)
  records["sft"] = records["sft"] * 2
  with pytest.raises(ValueError, match=r"reference split: \d+ ids are in both sft_train and "):
    ps.split_records(records, ps.PRISM, "reference")


def test_bad_mode_and_source():
  with pytest.raises(ValueError, match=r"'rows'.*\('conversation', 'reference'\)"):
    ps.split_records({"sft": [], "dpo": []}, ps.CA, "rows")
  with pytest.raises(ValueError, match="unknown source 'facebook'"):
    ps.split_records({"sft": [], "dpo": []}, "facebook")
  assert ps.SPLIT_MODES == ("conversation", "reference")
