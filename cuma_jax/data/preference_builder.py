"""The TFDS builder of the preference datasets (Community Alignment, PRISM, synthetic), stored
as array_record and read back by random access without TensorFlow, as the survey builders.

See docs/preference.md#data.  Records hold raw text (messages as JSON), so one
prepared dataset serves every tokenizer.  Splits: ``sft_train``, ``sft_test``,
``dpo_train``, ``dpo_test`` and, for Community Alignment and the synthetic data, ``ca_eval``
(the 4-way accuracy set).  The rows each reader skipped, by reason, are kept in the
dataset's metadata (``skip_counts``); the synthetic data's oracle is written beside it.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from cuma_jax import fingerprint
from cuma_jax.data import builders, preference_sources, synthetic_preference

SOURCES = ("synthetic_preference", "community_alignment", "prism")
SPLITS = ("sft_train", "sft_test", "dpo_train", "dpo_test", "ca_eval")

FEATURES = tfds.features.FeaturesDict(
  {
    "id": tfds.features.Text(),
    "source": tfds.features.Text(),
    "conversation_id": tfds.features.Text(),
    "turn": np.int32,
    "profile": tfds.features.Text(),
    "profile_fields": tfds.features.Text(),
    "messages": tfds.features.Text(),
    "chosen": tfds.features.Text(),
    "rejected": tfds.features.Text(),
    "question": tfds.features.Text(),
    "options": tfds.features.Sequence(tfds.features.Text()),
    "answer": np.int32,
    "question_id": tfds.features.Text(),
    "chosen_option": np.int32,
  }
)


@dataclasses.dataclass(eq=False)
class PreferenceConfig(tfds.core.BuilderConfig):
  """source: one of SOURCES; split_mode: ``preference_sources.SPLIT_MODES``."""

  source: str = "synthetic_preference"
  split_mode: str = "conversation"
  synthetic: synthetic_preference.SyntheticPreferenceConfig = (
    synthetic_preference.SyntheticPreferenceConfig()
  )


class CumaPreference(builders.ArrayRecordBuilder):
  """Chat SFT rows, DPO pairs and the 4-way accuracy set of one preference source."""

  name = "cuma_preference"
  DESCRIPTION = "Preference data: chat SFT rows, DPO pairs, Community-Alignment-style choices."
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Community Alignment and PRISM come from the Hugging Face hub; save them under manual_dir "
    "as docs/preference.md#data describes."
  )
  BUILDER_CONFIGS = [PreferenceConfig(name="synthetic_preference")]
  RECORD_FEATURES = FEATURES

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    config = self.builder_config
    counts: collections.Counter = collections.Counter()
    if config.source == "synthetic_preference":
      records, oracle = synthetic_preference.generate(config.synthetic)
      synthetic_preference.write_oracle(oracle, self.data_path)
      source = synthetic_preference.SOURCE
    elif config.source == "community_alignment":
      rows = preference_sources.read_community_alignment(dl_manager.manual_dir)
      records = preference_sources.community_alignment_records(rows, counts)
      source = config.source
    else:
      conversations, survey = preference_sources.read_prism(dl_manager.manual_dir)
      records = preference_sources.prism_records(conversations, survey, counts)
      source = config.source
    splits = preference_sources.split_records(records, source, config.split_mode)
    self.info.metadata["skip_counts"] = dict(sorted(counts.items()))
    self.info.metadata["profiles"] = {
      name: sorted({row["profile"] for row in rows}) for name, rows in splits.items()
    }
    return {name: enumerate(rows) for name, rows in splits.items() if rows}


def prepared_builder(data_config, data_dir: str, log=print) -> tfds.core.DatasetBuilder:
  """The preference dataset of ``config.data``, prepared once per content of its inputs
  (the synthetic settings, or the manual directory's files) and split mode."""
  source = data_config.dataset
  synthetic = data_config.synthetic_preference
  if source == "synthetic_preference":
    inputs: Any = dataclasses.asdict(synthetic)
    download_config = None
  else:
    manual_dir = builders.manual_directory(
      data_config, f"the folder holding the {source} files (docs/preference.md#data)"
    )
    # Keyed by the path under manual_dir: saved-layout files of several tables share names.
    inputs = {
      os.path.relpath(path, manual_dir): fingerprint.fingerprint(path)
      for path in preference_sources.input_files(manual_dir, source)
    }
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  key = fingerprint.digest(
    {
      "source": source,
      "split": data_config.split_mode,
      "revision": preference_sources.SPLITS_REVISION,
      "inputs": inputs,
    }
  )
  builder = CumaPreference(
    data_dir=data_dir,
    config=PreferenceConfig(
      name=f"{source}_{key[:12]}",
      source=source,
      split_mode=data_config.split_mode,
      synthetic=synthetic,
    ),
  )
  return builders.prepare_once(builder, download_config, log)


def load_oracle(source) -> synthetic_preference.PreferenceOracle:
  """The synthetic data's oracle, stored beside the prepared dataset (a data source of it)."""
  return synthetic_preference.PreferenceOracle.load(Path(source.dataset_info.data_dir))
