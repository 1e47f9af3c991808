"""A small hand-written WorldValuesBench manual directory, for tests and examples.

The real files need a WVS registration; this fixture reproduces their layout, codebook format
(negative "missing" codes included) and the kinds of bad cells the reader must skip. What it
holds is fixed, so tests can state expected examples and skip counts literally:

train  156070001 China          Q1=1  Q46=2      Q106=7   -> 3 examples
       818070002 Egypt          Q1=1  Q46=""     Q106=-1  -> 1 (1 empty, 1 negative)
       840070003 United States  Q1=7  Q46=text   Q106=10  -> 1 (7 not an option, 1 non-numeric)
       276070004 Germany        Q1=2  Q46=1      Q106=""  -> 0 (ethnicity empty: 2 dropped, 1 empty)
       392070005 (no demographic row) Q1=3, rest empty    -> 0 (1 dropped, 2 empty)
       410070006 South Korea    Q1=2.0 Q46=4     Q106=1   -> 3
valid  484070007 Mexico         Q1=1  Q46=1      Q106=5   -> 3
test   356070008 India          Q1=2  Q46=2      Q106=3   -> 3
       504070009 Morocco        Q1=1  Q46=3      Q106=9   -> 3
Every value TSV also has a column Q999 absent from the codebook (a skipped question).
`full` holds all participants of the three splits.
"""

from __future__ import annotations

from pathlib import Path

from cuma_jax.data.wvb import write_wvb_tree

_MISSING = {"-1": "Don't know", "-2": "No answer", "-4": "Not asked", "-5": "Missing; Unknown"}

CODEBOOK = {
  "Q1": {
    "question": "Important in life: Family",
    "question_instruction": "For each of the following, indicate how important it is in your life.",
    "type": "multiple_choice",
    "choices": {
      "1": "Very important",
      "2": "Rather important",
      "3": "Not very important",
      "4": "Not at all important",
      **_MISSING,
    },
  },
  "Q46": {
    "question": "Feeling of happiness",
    "question_instruction": "Taking all things together, would you say you are happy?",
    "type": "multiple_choice",
    "choices": {
      "1": "Very happy",
      "2": "Rather happy",
      "3": "Not very happy",
      "4": "Not at all happy",
      **_MISSING,
    },
  },
  "Q106": {
    "question": "Income equality vs larger income differences",
    "question_instruction": "",
    "type": "multiple_choice",
    "choices": {
      "1": "Incomes more equal",
      **{str(i): str(i) for i in range(2, 10)},
      "10": "Larger income differences",
      **_MISSING,
    },
  },
}

QUESTION_METADATA = {
  **{
    column: {
      "question": column,
      "category": "Demographic and Socioeconomic Variables",
      "use_case": "demographic",
      "answer_scale_min": "",
      "answer_scale_max": "",
      "answer_data_type": "non_ordinal",
    }
    for column in (
      "B_COUNTRY",
      "D_INTERVIEW",
      "X003R",
      "Q260",
      "Q273",
      "Q275",
      "Q279",
      "Q289",
      "Q290",
      "H_URBRURAL",
    )
  },
  "Q1": {
    "question": "On a scale of 1 to 4, 1 meaning 'Very important' and 4 meaning 'Not at all "
    "important', how important is family in your life?",
    "category": "Social Values, Norms, Stereotypes",
    "use_case": "value",
    "answer_scale_min": 1,
    "answer_scale_max": 4,
    "answer_data_type": "ordinal",
  },
  "Q46": {
    "question": "On a scale of 1 to 4, 1 meaning 'Very happy' and 4 meaning 'Not at all "
    "happy', how happy are you?",
    "category": "Happiness and Well-being",
    "use_case": "value",
    "answer_scale_min": 1,
    "answer_scale_max": 4,
    "answer_data_type": "ordinal",
  },
  "Q106": {
    "question": "On a scale of 1 to 10, 1 meaning 'Incomes should be made more equal' and "
    "10 meaning 'There should be greater incentives for individual effort', "
    "how would you place your views?",
    "category": "Economic Values",
    "use_case": "value",
    "answer_scale_min": 1,
    "answer_scale_max": 10,
    "answer_data_type": "ordinal",
  },
}

_DEMOGRAPHIC_COLUMNS = (
  "D_INTERVIEW",
  "B_COUNTRY",
  "H_URBRURAL",
  "X003R",
  "Q260",
  "Q275",
  "Q273",
  "Q289",
  "Q290",
  "Q279",
)
_VALUE_COLUMNS = ("D_INTERVIEW", "Q1", "Q46", "Q106", "Q999")

# split: [(demographic values or None for "no row", value cells)]
_PARTICIPANTS: dict[str, list[tuple[tuple[str, ...] | None, tuple[str, ...]]]] = {
  "train": [
    (
      (
        "156070001",
        "China",
        "Urban",
        "25-34 years",
        "Female",
        "Bachelor or equivalent (ISCED 6)",
        "Married",
        "Do not belong to a denomination",
        "CN: Han Chinese",
        "Full time (30 hours a week or more)",
      ),
      ("156070001", "1", "2", "7", "3"),
    ),
    (
      (
        "818070002",
        "Egypt",
        "Rural",
        "16-24 years",
        "Male",
        "Upper secondary education (ISCED 3)",
        "Single",
        "Muslim",
        "EG: Arab",
        "Student",
      ),
      ("818070002", "1", "", "-1", "1"),
    ),
    (
      (
        "840070003",
        "United States",
        "Urban",
        "65 and more years",
        "Female",
        "Master or equivalent (ISCED 7)",
        "Widowed",
        "Protestant",
        "US: White",
        "Retired/pensioned",
      ),
      ("840070003", "7", "Very happy", "10", ""),
    ),
    (
      (
        "276070004",
        "Germany",
        "Urban",
        "45-54 years",
        "Male",
        "Short-cycle tertiary education (ISCED 5)",
        "Divorced",
        "Roman Catholic",
        "",
        "Self employed",
      ),
      ("276070004", "2", "1", "", "2"),
    ),
    (None, ("392070005", "3", "", "", "")),
    (
      (
        "410070006",
        "South Korea",
        "Urban",
        "35-44 years",
        "Male",
        "Bachelor or equivalent (ISCED 6)",
        "Married",
        "Buddhist",
        "KR: Korean",
        "Full time (30 hours a week or more)",
      ),
      ("410070006", "2.0", "4", "1", "4"),
    ),
  ],
  "valid": [
    (
      (
        "484070007",
        "Mexico",
        "Urban",
        "25-34 years",
        "Female",
        "Lower secondary education (ISCED 2)",
        "Living together as married",
        "Roman Catholic",
        "MX: Mestizo",
        "Part time (less than 30 hours a week)",
      ),
      ("484070007", "1", "1", "5", ""),
    ),
  ],
  "test": [
    (
      (
        "356070008",
        "India",
        "Rural",
        "35-44 years",
        "Male",
        "Primary education (ISCED 1)",
        "Married",
        "Hindu",
        "IN: Hindi speaking",
        "Self employed",
      ),
      ("356070008", "2", "2", "3", ""),
    ),
    (
      (
        "504070009",
        "Morocco",
        "Urban",
        "55-64 years",
        "Female",
        "Early childhood education (ISCED 0) / no education",
        "Married",
        "Muslim",
        "MA: Arab",
        "Housewife not otherwise employed",
      ),
      ("504070009", "1", "3", "9", ""),
    ),
  ],
}


def write_wvb_fixture(root: str | Path) -> Path:
  """Writes the fixture (module docstring) under `root`; returns `root`."""
  splits: dict[str, tuple[list[dict[str, str]], list[dict[str, str]]]] = {}
  for split, participants in _PARTICIPANTS.items():
    demographic = [
      dict(zip(_DEMOGRAPHIC_COLUMNS, d, strict=True)) for d, _ in participants if d is not None
    ]
    values = [dict(zip(_VALUE_COLUMNS, v, strict=True)) for _, v in participants]
    splits[split] = (demographic, values)
  demographic, values = (
    [row for split in ("train", "valid", "test") for row in splits[split][i]] for i in (0, 1)
  )
  splits["full"] = (demographic, values)
  return write_wvb_tree(root, CODEBOOK, QUESTION_METADATA, splits)
