"""TFDS builders for WorldValuesBench and the synthetic survey, stored as array_record.

See docs/data.md#prepared-datasets.

TensorFlow is not needed, neither to build nor to read: TFDS serialises examples with its own
copy of the tf.Example protos, array_record files are written by the `array_record` package, and
`tfds.data_source` reads them back by random access. Only the default `tfrecord` file format
needs TensorFlow, so the builders default to `file_format="array_record"`.

Records hold raw text (prompt parts, profile, answer letter and codes), so one prepared dataset
serves every tokenizer; tokenisation happens in the grain pipeline. Each split's sorted table of
distinct profile strings, the question table and the reader's skip counts are kept in the
dataset's metadata (`source.dataset_info.metadata`).

    sources = tfds.data_source("cuma_world_values_bench/sampled_50k", data_dir=...,
        download_and_prepare_kwargs={"download_config": tfds.download.DownloadConfig(
            manual_dir="/path/to/WorldValuesBench-root")})
    sources = tfds.data_source("cuma_synthetic_survey/default", data_dir=...)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
import contextlib
import dataclasses
import inspect
import io
import os
from pathlib import Path
import shutil
import time
from typing import Any

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from cuma_jax import fingerprint
from cuma_jax.data import prompts, synthetic, wvb

RAW_DIR = "raw"  # the synthetic survey's WVB-layout files, next to its array_record files

FEATURES = tfds.features.FeaturesDict(
  {
    "question_id": tfds.features.Text(),
    "participant_id": np.int64,
    "user": tfds.features.Text(),
    "profile": tfds.features.Text(),
    "demographics": {field: tfds.features.Text() for field in prompts.PROFILE_FIELDS},
    "answer_letter": tfds.features.Text(),
    "answer_option": np.int32,
    "answer_code": np.int32,
    "option_codes": tfds.features.Sequence(np.int32),
    "num_options": np.int32,
  }
)


# tfds has no types: mypy sends the class keyword to object.__init_subclass__.
class ArrayRecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):  # type: ignore[call-arg]
  """The array_record file format (no TensorFlow), records in key order, the survey's
  features (``RECORD_FEATURES``: another dataset names its own) and metadata."""

  VERSION = tfds.core.Version("1.0.0")
  DESCRIPTION = ""
  RECORD_FEATURES = FEATURES

  def __init__(self, *, file_format: str = "array_record", **kwargs: Any):
    super().__init__(file_format=file_format, **kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """The defining file, as TFDS's own fallback finds it.

    TFDS's default first probes `importlib_resources`, a package it uses but does not
    declare as a dependency (tensorflow/datasets#11212); this avoids needing it.
    """
    return epath.Path(inspect.getfile(cls))

  def _keep_generation_order(self) -> bool:
    """Store records sorted by key; otherwise TFDS orders them by a hash of the key."""
    return True

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.DESCRIPTION,
      features=self.RECORD_FEATURES,
      metadata=tfds.core.MetadataDict(),
      disable_shuffling=self._keep_generation_order(),
    )

  def _set_questions(self, reader: wvb.WvbReader, split: str) -> None:
    self.info.metadata["questions"] = [q.to_json() for q in reader.questions(split)]

  def _generate_examples(
    self,
    keyed_examples: Iterable[tuple[int, dict[str, Any]]],
    split: str,
    counts: wvb.SkipCounts,
  ) -> Iterator[tuple[int, dict[str, Any]]]:
    profiles = set()
    for key, example in keyed_examples:
      profiles.add(example["profile"])
      yield key, example
    self.info.metadata.setdefault("profiles", {})[split] = sorted(profiles)
    self.info.metadata.setdefault("skip_counts", {})[split] = counts.as_dict()

  def _split(
    self, reader: wvb.WvbReader, split: str, incomplete_profiles: str = wvb.DROP
  ) -> Iterator[tuple[int, dict[str, Any]]]:
    counts = wvb.SkipCounts()
    examples = reader.examples(split, counts, incomplete_profiles)
    return self._generate_examples(enumerate(examples), split, counts)


@dataclasses.dataclass(eq=False)
class WvbConfig(tfds.core.BuilderConfig):
  """train_size/test_size None: every example; else a seeded sample of the train/test splits.

  incomplete_profiles: what becomes of a participant with an empty profile field
  (``wvb.DROP`` or ``wvb.AS_NAN``).
  """

  train_size: int | None = None
  test_size: int | None = None
  valid_size: int | None = None  # sampled configs: drawn from WVB's valid split
  sample_seed: int = 42
  incomplete_profiles: str = wvb.DROP


class CumaWorldValuesBench(ArrayRecordBuilder):
  """WorldValuesBench from a manual directory (WVS needs registration, so no download)."""

  name = "cuma_world_values_bench"
  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {
    "1.1.0": "sampled_50k keeps participants with an empty profile field (it reads 'nan').",
    "1.2.0": "sampled_50k has a valid split: 5k examples of WVB's valid split, seed 42.",
  }
  DESCRIPTION = "WorldValuesBench: one example per (participant, value question) answer."
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Obtain WVS wave 7 and run WorldValuesBench's dataset_construction/data_preparation.py; "
    "pass the repository root as manual_dir. It must hold:\n" + wvb.LAYOUT
  )
  BUILDER_CONFIGS = [
    WvbConfig(
      name="full",
      description="All train/valid/test examples of participants with a complete profile.",
    ),
    WvbConfig(
      name="sampled_50k",
      train_size=50_000,
      test_size=5_000,
      valid_size=5_000,
      sample_seed=42,
      incomplete_profiles=wvb.AS_NAN,
      description="The paper's sample: 50k train and 5k test examples, seed 42, drawn from the "
      "released preprocessing's rows (an empty profile field reads 'nan'); and 5k valid "
      "examples drawn the same way from WVB's valid split, for choosing settings.",
    ),
  ]

  def _keep_generation_order(self) -> bool:
    # A sample keeps its sampling order. The full splits (15M examples) use TFDS's hashed
    # order: keeping key order would make TFDS sort the whole split in memory.
    return self.builder_config.train_size is not None

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    reader = wvb.WvbReader(dl_manager.manual_dir)
    self._set_questions(reader, "train")
    config = self.builder_config
    reader.check_disjoint(
      ("train", "valid", "test") if config.train_size is None else ("train", "test")
    )
    if config.train_size is None:
      return {
        split: self._split(reader, split, config.incomplete_profiles)
        for split in ("train", "valid", "test")
      }
    sizes = {"train": config.train_size, "valid": config.valid_size, "test": config.test_size}
    return {
      split: self._sampled(reader, split, size, config.sample_seed, config.incomplete_profiles)
      for split, size in sizes.items()
      if size is not None
    }

  def _sampled(
    self, reader: wvb.WvbReader, split: str, size: int, seed: int, incomplete_profiles: str
  ):
    """`size` examples, as the authors' `Dataset.shuffle(seed).select(range(size))` picks."""
    counts = wvb.SkipCounts()
    total = sum(1 for _ in reader.examples(split, counts, incomplete_profiles))
    order = np.random.default_rng(seed).permutation(total)[:size]
    rank = {int(i): r for r, i in enumerate(order)}
    examples = reader.examples(split, incomplete_profiles=incomplete_profiles)
    chosen = ((rank[i], ex) for i, ex in enumerate(examples) if i in rank)
    return self._generate_examples(chosen, split, counts)


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  survey: synthetic.SyntheticSurveyConfig = synthetic.SyntheticSurveyConfig()


class CumaSyntheticSurvey(ArrayRecordBuilder):
  """The synthetic survey of `synthetic.py`, generated locally, read with the WVB reader."""

  name = "cuma_synthetic_survey"
  DESCRIPTION = "Synthetic cultural value survey with exact per-profile answer distributions."
  BUILDER_CONFIGS = [
    SyntheticConfig(name="default", description="12 countries, 24 questions, 2,750 participants."),
    SyntheticConfig(
      name="tiny",
      description="For tests: a few hundred examples.",
      survey=synthetic.SyntheticSurveyConfig(
        num_countries=4, num_questions=6, num_train=60, num_valid=10, num_test=10, num_zero_shot=10
      ),
    ),
  ]

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    survey = synthetic.generate_survey(self.builder_config.survey)
    reader = wvb.WvbReader(survey.write_wvb(Path(self.data_path) / RAW_DIR))
    self._set_questions(reader, "train")
    reader.check_disjoint(tuple(survey.participants))
    return {split: self._split(reader, split) for split in survey.participants}


def prepared_builder(data_config, data_dir: str, log=print) -> tfds.core.DatasetBuilder:
  """The builder of ``config.data``, prepared once per content of its inputs.

  The builder config's name carries a digest of what the records are made of (the synthetic
  survey's settings; the WVB files the reader reads), so a changed manual directory is
  prepared anew instead of reusing records of the old one.
  """
  if data_config.dataset == "synthetic":
    survey = data_config.synthetic
    key = fingerprint.digest(dataclasses.asdict(survey))
    builder = CumaSyntheticSurvey(
      data_dir=data_dir, config=SyntheticConfig(name=f"s{key[:12]}", survey=survey)
    )
    download_config = None
  else:
    manual_dir = manual_directory(data_config, f"the WorldValuesBench root ({wvb.DOCS})")
    files = {
      name: digest
      for path in wvb.input_files(manual_dir)
      if path.is_file()
      for name, digest in fingerprint.fingerprint(path).items()
    }
    base = CumaWorldValuesBench.builder_configs[data_config.builder_config]
    name = f"{base.name}_{fingerprint.digest(files)[:12]}"
    builder = CumaWorldValuesBench(data_dir=data_dir, config=dataclasses.replace(base, name=name))
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  return prepare_once(builder, download_config, log)


def manual_directory(data_config, holding: str) -> str:
  """``config.data.manual_dir``, refused unless it is a directory (holding ``holding``)."""
  manual_dir = data_config.manual_dir
  if not manual_dir or not os.path.isdir(manual_dir):
    raise FileNotFoundError(
      f"config.data.manual_dir={manual_dir!r} is not a directory; point it at {holding}"
    )
  return manual_dir


def prepare_once(builder, download_config, log) -> tfds.core.DatasetBuilder:
  """Prepares ``builder`` unless a builder of the same name (a digest of its inputs) is; then
  removes what interrupted preparations of it left (TFDS's ``incomplete.*`` folders)."""
  started = time.time()
  if builder.is_prepared():
    log(f"reusing the dataset prepared in {builder.data_dir} (its inputs are unchanged)")
  else:
    log(f"preparing the dataset in {builder.data_dir}")
    # TFDS prints its sizes to stdout: "Unknown size" three times for records it generates.
    with contextlib.redirect_stdout(io.StringIO()):
      builder.download_and_prepare(download_config=download_config)
  parent = Path(builder.data_dir).parent
  for left in sorted(parent.glob("incomplete.*")):
    # One changed since this preparation started may be another process's, still running.
    if left.is_dir() and left.stat().st_mtime < started:
      shutil.rmtree(left)
      log(f"removed {left}, left by an interrupted preparation of this dataset")
  return builder


def load_oracle(source) -> synthetic.SurveyOracle:
  """The exact distributions stored beside a prepared synthetic survey (a data source of it)."""
  return synthetic.SurveyOracle.load(Path(source.dataset_info.data_dir) / RAW_DIR)
