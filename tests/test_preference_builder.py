"""The cuma_preference TFDS builder: Community Alignment and PRISM prepared from the fixture's
manual directory (any layout), read back by random access; the synthetic data and its oracle."""

import json

import pytest

from cuma_jax import schema
from cuma_jax.data import preference_builder, synthetic_preference
from cuma_jax.data.pipeline import as_text
from cuma_jax.tiny.preference_fixture import write_preference_fixture

SPLITS = ("sft_train", "sft_test", "dpo_train", "dpo_test")


def _data(dataset, manual_dir="", **synthetic):
  return schema.DataSection(
    dataset=dataset,
    manual_dir=str(manual_dir),
    synthetic_preference=synthetic_preference.SyntheticPreferenceConfig(**synthetic),
  )


def _rows(source):
  return [source[i] for i in range(len(source))]


@pytest.mark.parametrize("layout", ["jsonl", "saved"])
def test_community_alignment_and_prism_prepare_from_the_manual_directory(tmp_path, layout):
  root = write_preference_fixture(tmp_path / "manual", layout)
  # The fixture's totals (tiny/preference_fixture.py): CA SFT 5, DPO 14, accuracy rows 3;
  # PRISM SFT 4, DPO 6.
  for dataset, sft, dpo, accuracy_conversations, skipped in (
    ("community_alignment", 5, 14, {"ca-001", "ca-003", "ca-006"}, 11),
    ("prism", 4, 6, set(), 4),
  ):
    builder = preference_builder.prepared_builder(
      _data(dataset, root), str(tmp_path / "tfds"), log=lambda *_: None
    )
    sources = builder.as_data_source()
    assert sum(len(sources[s]) for s in ("sft_train", "sft_test")) == sft
    assert sum(len(sources[s]) for s in ("dpo_train", "dpo_test")) == dpo
    metadata = builder.info.metadata
    assert sum(metadata["skip_counts"].values()) == skipped
    train = {as_text(r["conversation_id"]) for r in _rows(sources["sft_train"])}
    test = {as_text(r["conversation_id"]) for r in _rows(sources["sft_test"])}
    assert train and test and not train & test  # split by conversation
    # The accuracy set holds the test conversations' accuracy rows only.
    ca_eval = _rows(sources["ca_eval"]) if "ca_eval" in sources else []
    assert {as_text(r["conversation_id"]) for r in ca_eval} == accuracy_conversations & test
    for split in sources:
      profiles = sorted({as_text(r["profile"]) for r in _rows(sources[split])})
      assert metadata["profiles"][split] == profiles
  # Prepared once per input contents: a second call reuses it, an edited file does not.
  logs = []
  preference_builder.prepared_builder(_data("prism", root), str(tmp_path / "tfds"), logs.append)
  assert any("reusing" in line for line in logs)


def test_a_changed_file_is_prepared_anew(tmp_path):
  root = write_preference_fixture(tmp_path / "manual", "jsonl")
  first = preference_builder.prepared_builder(
    _data("prism", root), str(tmp_path / "tfds"), log=lambda *_: None
  )
  path = root / "prism" / "survey.jsonl"
  path.write_text(path.read_text().replace("Retired", "Working part-time"))
  second = preference_builder.prepared_builder(
    _data("prism", root), str(tmp_path / "tfds"), log=lambda *_: None
  )
  assert first.data_dir != second.data_dir
  profiles = [p for p in second.info.metadata["profiles"]["sft_train"] if "Mexico" in p]
  profiles += [p for p in second.info.metadata["profiles"]["sft_test"] if "Mexico" in p]
  assert profiles and all("Working part-time" in p for p in profiles)


def test_a_missing_manual_directory_is_refused_before_anything_is_written(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.data.manual_dir='/nowhere'"):
    preference_builder.prepared_builder(_data("prism", "/nowhere"), str(tmp_path / "tfds"))
  assert not (tmp_path / "tfds").exists()


def test_synthetic_preferences_prepare_with_their_oracle(tmp_path):
  builder = preference_builder.prepared_builder(
    _data("synthetic_preference", num_users=16, num_questions=4),
    str(tmp_path / "tfds"),
    log=lambda *_: None,
  )
  sources = builder.as_data_source()
  oracle = preference_builder.load_oracle(sources["sft_train"])
  # 16 users x 4 questions: 64 conversations, two SFT rows and three pairs each.
  assert sum(len(sources[s]) for s in ("sft_train", "sft_test")) == 128
  assert sum(len(sources[s]) for s in ("dpo_train", "dpo_test")) == 192
  for record in _rows(sources["dpo_train"]):
    profile = as_text(record["profile"])
    question = json.loads(as_text(record["messages"]))[-1]["content"]
    chosen = oracle.reply_option(question, as_text(record["chosen"]))
    assert chosen == int(record["chosen_option"])
    assert oracle.reply_option(question, as_text(record["rejected"])) not in (None, chosen)
    assert profile in oracle.culture_of_profile
