"""A synthetic cultural value survey with a known answer distribution for every profile.

See docs/data.md#synthetic-survey.

Why: CuMA's claim is that a profile-blind fit converges to the population mean ("mean
collapse") while demographic routing recovers per-culture answers. Testing that needs data where
the best achievable per-profile prediction is known exactly; WVS itself cannot be shipped.

The generative model:
- K latent cultures. A profile (country, age group, gender, education, marital status, religion,
  ethnicity, employment) gives P(culture | profile) = softmax of a sum of per-attribute logits:
  country strongly (each country has a home culture), religion and age moderately, the other
  attributes weakly.
- Value questions with WVS-like ordinal scales (4, 5 or 10 points, WVS-style wording). On most
  questions the cultures' answer distributions peak at different points of the scale, so the
  population marginal is multi-modal; on a few (consensus questions) they agree.
- A participant draws a culture from P(culture | profile), then each answer from
  P(answer | culture, question); some cells are left empty, as in WVB.
- The zero-shot split draws its participants from (country, age group, gender) cells that no
  other split contains, so none of its profile strings occurs in training.

`SyntheticSurvey.write_wvb` writes the survey in WorldValuesBench's layout, so the WVB reader
and builder serve both, plus `synthetic_oracle.json` holding the exact distributions that
`SurveyOracle` exposes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from cuma_jax import fields
from cuma_jax.data import prompts, wvb
from cuma_jax.fields import field

ORACLE_FILENAME = "synthetic_oracle.json"
SPLITS = ("train", "valid", "test", "zero_shot")

COUNTRIES = (
  "Argentina",
  "Australia",
  "Brazil",
  "Canada",
  "Chile",
  "China",
  "Colombia",
  "Egypt",
  "Ethiopia",
  "Germany",
  "Greece",
  "India",
  "Indonesia",
  "Iran",
  "Japan",
  "Jordan",
  "Kenya",
  "Mexico",
  "Morocco",
  "Netherlands",
  "Nigeria",
  "Pakistan",
  "Peru",
  "Philippines",
  "Romania",
  "Russia",
  "South Korea",
  "Sweden",
  "Thailand",
  "Turkey",
  "United States",
  "Vietnam",
)
AGE_GROUPS = (
  "16-24 years",
  "25-34 years",
  "35-44 years",
  "45-54 years",
  "55-64 years",
  "65 and more years",
)
GENDERS = ("Male", "Female")
EDUCATION = (
  "Early childhood education (ISCED 0) / no education",
  "Primary education (ISCED 1)",
  "Lower secondary education (ISCED 2)",
  "Upper secondary education (ISCED 3)",
  "Post-secondary non-tertiary education (ISCED 4)",
  "Short-cycle tertiary education (ISCED 5)",
  "Bachelor or equivalent (ISCED 6)",
  "Master or equivalent (ISCED 7)",
  "Doctoral or equivalent (ISCED 8)",
)
EDUCATION_P = (0.05, 0.12, 0.15, 0.28, 0.08, 0.08, 0.16, 0.06, 0.02)
MARITAL = ("Married", "Living together as married", "Divorced", "Separated", "Widowed", "Single")
MARITAL_P = (0.5, 0.08, 0.07, 0.03, 0.07, 0.25)
RELIGIONS = (
  "Do not belong to a denomination",
  "Roman Catholic",
  "Protestant",
  "Orthodox (Russian/Greek/etc.)",
  "Jew",
  "Muslim",
  "Hindu",
  "Buddhist",
  "Other Christian (Evangelical/Pentecostal/Free church/etc.)",
)
ETHNICITIES = ("majority group", "minority group A", "minority group B")
ETHNICITY_P = (0.75, 0.17, 0.08)
EMPLOYMENT = (
  "Full time (30 hours a week or more)",
  "Part time (less than 30 hours a week)",
  "Self employed",
  "Retired/pensioned",
  "Housewife not otherwise employed",
  "Student",
  "Unemployed",
  "Other",
)
EMPLOYMENT_P = (0.35, 0.1, 0.12, 0.15, 0.1, 0.08, 0.07, 0.03)

_IMPORTANCE = ("Very important", "Rather important", "Not very important", "Not at all important")
_CONFIDENCE = ("A great deal", "Quite a lot", "Not very much", "None at all")
_AGREE = ("Agree strongly", "Agree", "Neither agree nor disagree", "Disagree", "Disagree strongly")
_JUSTIFIABLE = ("Never justifiable", *map(str, range(2, 10)), "Always justifiable")
_MENTIONED = ("Mentioned", "Not mentioned")
_FUTURE = ("Good thing", "Don't mind", "Bad thing")

# (category, question text, choices) templates in the WVS codebook's wording style.
QUESTION_BANK = (
  *[
    ("Social Values", f"Important in life: {t}", _IMPORTANCE)
    for t in ("Family", "Friends", "Leisure time", "Politics", "Work", "Religion")
  ],
  *[
    ("Social Values", f"Important child qualities: {t}", _MENTIONED)
    for t in ("Independence", "Hard work", "Religious faith", "Obedience")
  ],
  *[
    ("Social Values", f"Future changes: {t}", _FUTURE)
    for t in ("Less importance placed on work", "Greater respect for authority")
  ],
  *[
    ("Confidence in Institutions", f"Confidence: {t}", _CONFIDENCE)
    for t in (
      "The churches",
      "The armed forces",
      "The press",
      "Labor unions",
      "The police",
      "The courts",
      "The government",
      "Political parties",
      "Parliament",
      "Universities",
      "Banks",
      "The United Nations",
    )
  ],
  *[
    ("Economic Values", f"{t}", _AGREE)
    for t in (
      "When jobs are scarce, men should have more right to a job than women",
      "Having a job is the best way for a woman to be an independent person",
      "Work is a duty towards society",
      "Work should always come first, even if it means less spare time",
      "Adult children have the duty to provide long-term care for their parents",
      "People who don't work turn lazy",
      "It is humiliating to receive money without having to work for it",
      "When jobs are scarce, employers should give priority to people of this country "
      "over immigrants",
    )
  ],
  *[
    ("Ethical Values", f"Justifiable: {t}", _JUSTIFIABLE)
    for t in (
      "Homosexuality",
      "Prostitution",
      "Abortion",
      "Divorce",
      "Sex before marriage",
      "Suicide",
      "Euthanasia",
      "Death penalty",
      "Cheating on taxes if you have the chance",
      "Avoiding a fare on public transport",
      "Political violence",
      "Having casual sex",
    )
  ],
  *[
    ("Economic Values", t, (low, *map(str, range(2, 10)), high))
    for t, low, high in (
      (
        "Income equality vs larger income differences",
        "Incomes should be made more equal",
        "We need larger income differences as incentives for individual effort",
      ),
      (
        "Private vs state ownership of business",
        "Private ownership of business should be increased",
        "Government ownership of business should be increased",
      ),
      ("Competition good or harmful", "Competition is good", "Competition is harmful"),
      (
        "Success: hard work vs luck",
        "In the long run, hard work usually brings a better life",
        "Hard work doesn't generally bring success",
      ),
      (
        "Government's vs individual's responsibility",
        "The government should take more responsibility to ensure that everyone is provided for",
        "People should take more responsibility to provide for themselves",
      ),
    )
  ],
)

_MISSING_CODES = {"-1": "Don't know", "-2": "No answer"}


@dataclasses.dataclass(frozen=True)
class SyntheticSurveyConfig:
  """Sizes and effect strengths; participants per split, each answering every question.

  These defaults are the config's ``data.synthetic`` defaults too (one definition).
  """

  seed: int = field(0)
  num_cultures: int = field(4, low=1)
  num_countries: int = field(12, low=1, high=len(COUNTRIES))
  num_questions: int = field(24, low=1)
  min_options: int = field(4, low=2)
  max_options: int = field(10, low=2)
  num_train: int = field(2000, low=1)
  num_valid: int = field(250, low=0)
  num_test: int = field(250, low=0)
  num_zero_shot: int = field(250, low=0)
  # Of the (country, age group, gender) cells, the share held out for the zero-shot split.
  zero_shot_cell_fraction: float = field(0.15, low=0, high=1, high_open=True)
  missing_rate: float = field(0.05, low=0, high=1, high_open=True)  # empty answer cells
  country_strength: float = field(3.0, low=0)  # logit bonus of a country's home culture
  religion_strength: float = field(1.0, low=0)
  age_strength: float = field(1.0, low=0)
  other_strength: float = field(0.3, low=0)
  # Std of a culture's answers, in options of a 4-point scale.
  answer_width: float = field(0.6, low=0, low_open=True)
  consensus_fraction: float = field(0.15, low=0, high=1)  # questions all cultures agree on

  def __post_init__(self):
    fields.check(self, "data.synthetic")
    if self.min_options > self.max_options:
      raise ValueError(
        f"config.data.synthetic.min_options={self.min_options} exceeds "
        f"max_options={self.max_options}"
      )

  def split_sizes(self) -> dict[str, int]:
    """Participants per split; splits of size 0 are left out."""
    sizes = zip(
      SPLITS, (self.num_train, self.num_valid, self.num_test, self.num_zero_shot), strict=True
    )
    return {split: size for split, size in sizes if size > 0}


@dataclasses.dataclass(frozen=True)
class SurveyOracle:
  """Exact answer distributions of a synthetic survey.

  answer_given_culture: [K, Q, max_options] P(option | culture, question), zero-padded.
  culture_posterior: profile sentence -> [K] P(culture | profile), for every profile generated.
  population_marginal: [Q, max_options] mean of P(option | profile, question) over the training
    examples: the distribution a profile-blind model fits, whose argmax is the mean-collapse
    prediction.
  """

  question_ids: tuple[str, ...]
  option_codes: tuple[tuple[int, ...], ...]
  answer_given_culture: np.ndarray
  culture_posterior: dict[str, np.ndarray]
  population_marginal: np.ndarray

  def _q(self, question_id: str) -> int:
    return self.question_ids.index(question_id)

  def answer_distribution(self, profile: str, question_id: str) -> np.ndarray:
    """P(option | profile, question) = sum_c P(c | profile) P(option | c, question)."""
    q = self._q(question_id)
    n = len(self.option_codes[q])
    return self.culture_posterior[profile] @ self.answer_given_culture[:, q, :n]

  def optimal_option(self, profile: str, question_id: str) -> int:
    """The option index with the highest probability for this profile (Bayes-optimal)."""
    return int(np.argmax(self.answer_distribution(profile, question_id)))

  def population_option(self, question_id: str) -> int:
    """The option index a mean-collapsed (profile-blind) model predicts."""
    return int(np.argmax(self.population_marginal[self._q(question_id)]))

  def to_json(self) -> dict[str, Any]:
    return {
      "question_ids": list(self.question_ids),
      "option_codes": [list(c) for c in self.option_codes],
      "answer_given_culture": self.answer_given_culture.tolist(),
      "culture_posterior": {p: v.tolist() for p, v in self.culture_posterior.items()},
      "population_marginal": self.population_marginal.tolist(),
    }

  @classmethod
  def from_json(cls, data: dict[str, Any]) -> SurveyOracle:
    return cls(
      question_ids=tuple(data["question_ids"]),
      option_codes=tuple(tuple(c) for c in data["option_codes"]),
      answer_given_culture=np.asarray(data["answer_given_culture"], np.float64),
      culture_posterior={
        p: np.asarray(v, np.float64) for p, v in data["culture_posterior"].items()
      },
      population_marginal=np.asarray(data["population_marginal"], np.float64),
    )

  @classmethod
  def load(cls, path: str | Path) -> SurveyOracle:
    """Reads `synthetic_oracle.json` (or the directory holding it)."""
    path = Path(path)
    if path.is_dir():
      path = path / ORACLE_FILENAME
    return cls.from_json(json.loads(path.read_text(encoding="utf-8")))


@dataclasses.dataclass
class Participants:
  """One split's participants: their WVB demographic cells, culture posteriors and answers."""

  ids: np.ndarray  # [P] int
  values: dict[str, list[str]]  # field -> [P] text as the WVB demographic TSV holds it
  posterior: np.ndarray  # [P, K] P(culture | profile)
  answers: np.ndarray  # [P, Q] option index, -1 for an empty cell

  def profile_sentences(self) -> list[str]:
    return [
      prompts.profile_sentence(
        {
          **{f: self.values[f][i] for f in prompts.PROFILE_FIELDS},
          "age_group": prompts.age_group_text(self.values["age_group"][i]),
        }
      )
      for i in range(len(self.ids))
    ]


@dataclasses.dataclass
class SyntheticSurvey:
  config: SyntheticSurveyConfig
  questions: list[wvb.Question]
  categories: list[str]
  answer_given_culture: np.ndarray  # [K, Q, max_options]
  participants: dict[str, Participants]

  def oracle(self) -> SurveyOracle:
    posterior: dict[str, np.ndarray] = {}
    for group in self.participants.values():
      posterior.update(zip(group.profile_sentences(), group.posterior, strict=True))
    train = self.participants["train"]
    # Mean over the training examples (answered cells) of P(option | profile, question).
    per_example = np.einsum("pk,kqo->pqo", train.posterior, self.answer_given_culture)
    answered = (train.answers >= 0)[..., None]
    marginal = (per_example * answered).sum(0) / np.maximum(answered.sum(0), 1)
    return SurveyOracle(
      question_ids=tuple(q.question_id for q in self.questions),
      option_codes=tuple(q.option_codes for q in self.questions),
      answer_given_culture=self.answer_given_culture,
      culture_posterior=posterior,
      population_marginal=marginal,
    )

  def write_wvb(self, root: str | Path) -> Path:
    """Writes the WVB layout (splits train/valid/test/zero_shot and full) and the oracle."""
    codebook: dict[str, dict[str, Any]] = {}
    metadata: dict[str, dict[str, Any]] = {}
    for column in ("D_INTERVIEW", *prompts.WVB_PROFILE_COLUMNS.values()):
      metadata[column] = {
        "question": column,
        "category": "Demographic Variables",
        "use_case": "demographic",
        "answer_scale_min": "",
        "answer_scale_max": "",
        "answer_data_type": "non_ordinal",
      }
    for question, category in zip(self.questions, self.categories, strict=True):
      choices = {
        str(c): t for c, t in zip(question.option_codes, question.option_texts, strict=True)
      }
      codebook[question.question_id] = {
        "question": question.text,
        "question_instruction": "",
        "type": "multiple_choice",
        "choices": {**choices, **_MISSING_CODES},
      }
      metadata[question.question_id] = {
        "question": question.text,
        "category": category,
        "use_case": "value",
        "answer_scale_min": question.scale_min,
        "answer_scale_max": question.scale_max,
        "answer_data_type": "ordinal",
      }
    splits: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
    for split, group in self.participants.items():
      demographic: list[dict[str, Any]] = []
      values: list[dict[str, Any]] = []
      for i, pid in enumerate(group.ids):
        demographic.append(
          {
            "D_INTERVIEW": int(pid),
            **{
              column: group.values[field][i]
              for field, column in prompts.WVB_PROFILE_COLUMNS.items()
            },
          }
        )
        values.append(
          {
            "D_INTERVIEW": int(pid),
            **{
              q.question_id: (q.option_codes[a] if a >= 0 else None)
              for q, a in zip(self.questions, group.answers[i], strict=True)
            },
          }
        )
      splits[split] = (demographic, values)
    splits["full"] = (
      [row for demographic_rows, _ in splits.values() for row in demographic_rows],
      [row for _, value_rows in splits.values() for row in value_rows],
    )
    root = wvb.write_wvb_tree(root, codebook, metadata, splits)
    (root / ORACLE_FILENAME).write_text(json.dumps(self.oracle().to_json()), encoding="utf-8")
    return root


def _choice(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
  """One categorical draw per row of probs [N, C]."""
  cumulative = np.cumsum(probs, axis=-1)
  u = rng.random((probs.shape[0], 1)) * cumulative[:, -1:]
  return np.minimum((u >= cumulative).sum(-1), probs.shape[-1] - 1)


def _answer_distributions(rng, config: SyntheticSurveyConfig, num_options: list[int]) -> np.ndarray:
  """[K, Q, max_options] discretised Gaussians whose centres differ between cultures."""
  k = config.num_cultures
  table = np.zeros((k, len(num_options), max(num_options)))
  for q, n in enumerate(num_options):
    span = n - 1
    if rng.random() < config.consensus_fraction:
      centres = np.full(k, rng.uniform(0, span)) + rng.normal(0, 0.05 * span, k)
    else:
      centres = rng.permutation(np.linspace(0, span, k)) + rng.normal(0, 0.08 * span, k)
    width = config.answer_width * max(1.0, span / 3)
    grid = np.arange(n)
    dist = np.exp(-0.5 * ((grid[None, :] - np.clip(centres, 0, span)[:, None]) / width) ** 2)
    dist = 0.95 * dist / dist.sum(-1, keepdims=True) + 0.05 / n
    table[:, q, :n] = dist
  return table


def generate_survey(config: SyntheticSurveyConfig = SyntheticSurveyConfig()) -> SyntheticSurvey:
  """Draws the whole survey deterministically from config.seed.

  Every draw comes from one generator, in this order: countries, questions, answer
  distributions, the profile-to-culture model, held-out cells, then each split's
  participants. Reordering them changes every survey (and every result built on one).
  """
  rng = np.random.default_rng(config.seed)
  bank = _question_bank(config)
  countries = [
    COUNTRIES[i] for i in sorted(rng.choice(len(COUNTRIES), config.num_countries, replace=False))
  ]
  picked = [bank[i] for i in rng.choice(len(bank), config.num_questions, replace=False)]
  questions = [
    wvb.Question(
      question_id=f"Q{i + 1}",
      text=text,
      option_codes=tuple(range(1, len(choices) + 1)),
      option_texts=tuple(choices),
      scale_min=1,
      scale_max=len(choices),
    )
    for i, (_, text, choices) in enumerate(picked)
  ]
  answer_given_culture = _answer_distributions(rng, config, [len(c) for _, _, c in picked])
  cultures = _draw_cultures(rng, config, countries, answer_given_culture)
  cell_pool = _cell_pools(rng, config)
  participants = {}
  next_id = 1_000_001
  for split, size in config.split_sizes().items():
    cells = cell_pool["held" if split == "zero_shot" else "seen"]
    participants[split] = _draw_participants(rng, config, cultures, cells, size, next_id)
    next_id += size
  return SyntheticSurvey(
    config=config,
    questions=questions,
    categories=[c for c, _, _ in picked],
    answer_given_culture=answer_given_culture,
    participants=participants,
  )


def _question_bank(config: SyntheticSurveyConfig) -> list[tuple[str, str, tuple[str, ...]]]:
  """The template questions within the config's option range, after refusing sizes no
  survey can have (before anything is drawn)."""
  if config.num_train < 1:
    raise ValueError("num_train must be positive: the oracle's population is the train split")
  if not 1 <= config.num_countries <= len(COUNTRIES):
    raise ValueError(f"num_countries must be in 1..{len(COUNTRIES)}")
  bank = [t for t in QUESTION_BANK if config.min_options <= len(t[2]) <= config.max_options]
  if config.num_questions > len(bank):
    raise ValueError(
      f"only {len(bank)} template questions have {config.min_options}.."
      f"{config.max_options} options; asked for {config.num_questions}"
    )
  return bank


@dataclasses.dataclass(frozen=True)
class _Cultures:
  """The latent cultures, drawn once and shared by every split: P(culture | profile) =
  softmax(sum of per-attribute logit tables [num_values, K]), each country's religions, and
  each culture's answers."""

  countries: list[str]
  logits: dict[str, np.ndarray]
  religion_p: np.ndarray  # [num_countries, len(RELIGIONS)]
  answer_given_culture: np.ndarray  # [K, Q, max_options]


def _draw_cultures(
  rng, config: SyntheticSurveyConfig, countries, answer_given_culture
) -> _Cultures:
  """Draws the attribute logit tables (a country leans to its home culture, age along a
  per-culture slope, the other attributes at random) and each country's religion mix."""
  k = config.num_cultures
  home = rng.permutation(np.arange(config.num_countries) % k)
  age_z = (np.arange(len(AGE_GROUPS)) - 2.5) / 1.7
  logits = {
    "country": config.country_strength * np.eye(k)[home]
    + rng.normal(0, 0.3, (config.num_countries, k)),
    "religion": rng.normal(0, config.religion_strength, (len(RELIGIONS), k)),
    "age_group": config.age_strength * age_z[:, None] * rng.normal(0, 1, k)[None, :],
    **{
      field: rng.normal(0, config.other_strength, (size, k))
      for field, size in (
        ("gender", len(GENDERS)),
        ("education", len(EDUCATION)),
        ("marital_status", len(MARITAL)),
        ("ethnicity", len(ETHNICITIES)),
        ("employment", len(EMPLOYMENT)),
      )
    },
  }
  religion_p = rng.dirichlet(np.full(len(RELIGIONS), 0.4), config.num_countries)
  return _Cultures(countries, logits, religion_p, answer_given_culture)


def _cell_pools(rng, config: SyntheticSurveyConfig) -> dict[str, np.ndarray]:
  """The (country, age, gender) cells the zero-shot split alone draws from ("held") and
  those of every other split ("seen")."""
  cells = config.num_countries * len(AGE_GROUPS) * len(GENDERS)
  held = max(1, round(config.zero_shot_cell_fraction * cells)) if config.num_zero_shot else 0
  if held >= cells:
    raise ValueError("zero_shot_cell_fraction leaves no (country, age, gender) cell to train")
  held_cells = rng.choice(cells, held, replace=False)
  return {"seen": np.setdiff1d(np.arange(cells), held_cells), "held": np.sort(held_cells)}


def _draw_participants(
  rng, config: SyntheticSurveyConfig, cultures: _Cultures, cells, size: int, first_id: int
) -> Participants:
  """``size`` participants from ``cells``: their profile, its culture posterior, a culture
  drawn from it and their answers (some missing)."""
  countries = cultures.countries
  cell = rng.choice(cells, size)
  country, rest = np.divmod(cell, len(AGE_GROUPS) * len(GENDERS))
  age, gender = np.divmod(rest, len(GENDERS))
  attributes = {
    "country": country,
    "age_group": age,
    "gender": gender,
    "education": rng.choice(len(EDUCATION), size, p=EDUCATION_P),
    "marital_status": rng.choice(len(MARITAL), size, p=MARITAL_P),
    "religion": _choice(rng, cultures.religion_p[country]),
    "ethnicity": rng.choice(len(ETHNICITIES), size, p=ETHNICITY_P),
    "employment": rng.choice(len(EMPLOYMENT), size, p=EMPLOYMENT_P),
  }
  profile_logits = sum(cultures.logits[f][attributes[f]] for f in prompts.PROFILE_FIELDS)
  posterior = np.exp(profile_logits - profile_logits.max(-1, keepdims=True))
  posterior /= posterior.sum(-1, keepdims=True)
  culture = _choice(rng, posterior)
  by_culture = cultures.answer_given_culture
  answers = np.stack(
    [_choice(rng, by_culture[culture, q]) for q in range(by_culture.shape[1])], axis=1
  )
  answers[rng.random(answers.shape) < config.missing_rate] = -1
  names = {
    "country": countries,
    "age_group": AGE_GROUPS,
    "gender": GENDERS,
    "education": EDUCATION,
    "marital_status": MARITAL,
    "religion": RELIGIONS,
    "employment": EMPLOYMENT,
  }
  values = {f: [names[f][i] for i in attributes[f]] for f in names}
  values["ethnicity"] = [
    f"{countries[c]}: {ETHNICITIES[e]}"
    for c, e in zip(country, attributes["ethnicity"], strict=True)
  ]
  return Participants(
    ids=np.arange(first_id, first_id + size), values=values, posterior=posterior, answers=answers
  )
