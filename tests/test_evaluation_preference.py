"""Preference evaluation: Community Alignment accuracy against Hugging Face's torch model, the
rule judge on hand-built preferences, the win-rate's seeded position swaps with scripted
judges, and the synthetic preference data against its own generative model's definition."""

import collections
import json

from conftest import TINY, TINY_MODELS
import jax
import numpy as np
import pytest
import torch

from cuma_jax.data import ca_prompts
from cuma_jax.data import synthetic_preference as sp
from cuma_jax.data.preference_sources import RECORD_KEYS
from cuma_jax.evaluation import judging
from cuma_jax.evaluation import preference as evaluation
from cuma_jax.evaluation.predict import NonFiniteLogits
from cuma_jax.models.pretrained import load_pretrained

# ----------------------------------------------------------------------------- CA accuracy

CA_ROWS = [
  {
    "id": f"community_alignment:c{i}:0:0",
    "profile": profile,
    "question": question,
    "options": options,
    "answer": answer,
  }
  for i, (profile, question, options, answer) in enumerate(
    [
      ("Country: Japan", "Tea?", ["Yes.", "No.", "Green tea.", "Later."], 1),
      ("Country: Peru, Age: 30", "What to cook?", ["Rice.", "Soup.", "Fish.", "Salad."], 2),
      ("", "Where to go this summer?", ["Beach", "Hills", "Home", "City"], 0),
      ("Gender: Female", "Gift?", ["Money in an envelope.", "Wine.", "A book.", "Flowers."], 3),
      ("Country: Chile, Age: 65+", "Rest?", ["Sleep.", "Walk.", "Read.", "Cook."], 1),
    ]
  )
]


@pytest.fixture(scope="module")
def ca_model(chat_tokenizer, tmp_path_factory):
  """(directory, tokenizer, torch model) of a random tiny Qwen3 sized to the chat tokenizer."""
  tokenizer = chat_tokenizer("qwen3")
  directory = tmp_path_factory.mktemp("ca_qwen3")
  config_cls, model_cls, extra = TINY_MODELS["qwen3"]
  # Large random weights: the letter the model prefers depends on the prompt, by clear margins.
  config = config_cls(**{**TINY, **extra, "vocab_size": len(tokenizer)}, initializer_range=0.5)
  torch.manual_seed(2)
  torch_model = model_cls(config).eval()
  torch_model.save_pretrained(directory)
  return directory, tokenizer, torch_model


def _torch_letter(torch_model, tokenizer, row, letters):
  """The argmax letter of the torch model's logits after the row's own (unpadded) prompt."""
  ids = tokenizer.apply_chat_template(
    ca_prompts.ca_messages(row, "persona"),
    add_generation_prompt=True,
    enable_thinking=False,
    return_dict=True,
  )["input_ids"]
  with torch.no_grad():
    logits = torch_model(torch.tensor([ids])).logits[0, -1]
  return int(np.argmax(logits.numpy()[list(letters)])), len(ids)


def test_ca_accuracy_reads_each_row_s_last_prompt_token(ca_model):
  directory, tokenizer, torch_model = ca_model
  module, params = load_pretrained(directory)
  letters = ca_prompts.letter_token_ids(tokenizer)
  expected, lengths = zip(
    *(_torch_letter(torch_model, tokenizer, r, letters) for r in CA_ROWS), strict=True
  )
  assert len(set(lengths)) == len(CA_ROWS)  # every batch is padded
  assert expected == (1, 3, 0, 1, 1)  # the random model prefers different letters

  scores, records = evaluation.ca_accuracy(
    evaluation.Model("m", module, params), tokenizer, CA_ROWS, mode="persona", batch_size=2
  )
  assert [r["predicted"] for r in records] == list(expected)
  assert [r["answer"] for r in records] == [1, 2, 0, 3, 1]
  assert [r["id"] for r in records] == [r["id"] for r in CA_ROWS]
  assert {(r["model"], r["mode"]) for r in records} == {("m", "persona")}
  # Rows 0, 2 and 4 are right. Per-letter F1: A 1, B 2*2/(2*2+1) = 0.8, C 0, D 0.
  assert scores == {
    "accuracy": pytest.approx(3 / 5),
    "macro_f1": pytest.approx(0.45),
    "rows": 5,
    "truncated_prompts": 0,
  }


def test_ca_accuracy_refuses_non_finite_logits(ca_model):
  # Before, an argmax over NaN scores gave a normal-looking accuracy.
  directory, tokenizer, _ = ca_model
  module, params = load_pretrained(directory)
  params = jax.tree.map(lambda x: x * np.nan, params)
  with pytest.raises(NonFiniteLogits, match=r"5 of 5 examples of split 'ca_eval' scored by m"):
    evaluation.ca_accuracy(evaluation.Model("m", module, params), tokenizer, CA_ROWS, batch_size=2)


# ----------------------------------------------------------------------------- rule judge

REPLIES = (
  ("With a bow.", "With a firm handshake.", "With a warm hug.", "With a polite nod."),
  ("In gold.", "In a bank account.", "In land.", "In shares."),
)
ORACLE = sp.PreferenceOracle(
  questions=("How should I greet my new boss?", "Where should I save money?"),
  replies=REPLIES,
  preference=np.array(
    [
      [[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7]],
      [[0.5, 0.46, 0.02, 0.02], [0.3, 0.24, 0.26, 0.2]],
    ]
  ),
  culture_weights=np.array([0.6, 0.4]),
  culture_of_profile={"Country: Japan": 0, "Country: Brazil": 1},
)
BOSS = "user: How should I greet my new boss?"


@pytest.mark.parametrize(
  "profile, context, reply_a, reply_b, verdict, scores",
  [
    ("Country: Japan", BOSS, "With a bow.", "With a warm hug.", "A", (0.7, 0.1)),
    ("Country: Japan", BOSS, "with a WARM hug!!", "WITH A BOW", "B", (0.1, 0.7)),
    ("Country: Japan", BOSS, "I do not know.", "With a polite nod.", "B", (0.0, 0.1)),
    ("Country: Brazil", BOSS, "With a bow.", "With a firm handshake.", "tie", (0.5, 0.46)),
    ("Country: Brazil", BOSS, "With a bow, smiling.", "With a hug.", "A", (0.5, 0.0)),
    (
      "Country: Brazil",
      f"{BOSS}\nassistant: With a bow.\nuser: Where should I save money?",
      "In land.",
      "In gold.",
      "tie",
      (0.26, 0.3),
    ),
    ("Country: Japan", "user: Where should I save money?", "In shares", "In land", "A", (0.7, 0.1)),
  ],
)
def test_rule_judge_scores_by_the_culture_s_preference(
  profile, context, reply_a, reply_b, verdict, scores
):
  judge = evaluation.RuleJudge(ORACLE)
  case = judging.Case(profile, context, reply_a, reply_b)
  assert judge([case]) == [verdict]
  assert (judge.score(profile, context, reply_a), judge.score(profile, context, reply_b)) == (
    pytest.approx(scores[0]),
    pytest.approx(scores[1]),
  )
  assert judge.last_outputs == [f"score A {scores[0]:.3f}, score B {scores[1]:.3f}"]


# ----------------------------------------------------------------------------- win-rate

CASES = [{"id": f"c{i}", "profile": f"Country: C{i}", "context": f"user: q{i}"} for i in range(24)]


class PositionJudge:
  """Answers which position holds the reply "MODEL" (a judge that always picks the model)."""

  def __call__(self, cases):
    self.last_outputs = [f"saw {c.response_a} / {c.response_b}" for c in cases]
    return ["A" if c.response_a == "MODEL" else "B" for c in cases]


@pytest.mark.parametrize("seed", [0, 5])
def test_win_rate_swaps_positions_by_seed(seed):
  n = len(CASES)
  swaps = judging.position_swaps(n, seed)
  assert 0 < swaps.sum() < n
  model, base = ["MODEL"] * n, ["BASE"] * n
  tally, records = evaluation.win_rate(PositionJudge(), CASES, model, base, seed=seed)
  assert tally == {"wins": n, "losses": 0, "ties": 0, "win_rate": 1.0}
  assert [r["swapped"] for r in records] == swaps.tolist()
  assert [r["outcome"] for r in records] == ["win"] * n
  assert [r["verdict"] for r in records] == ["B" if s else "A" for s in swaps]
  assert [r["judge_output"] for r in records] == [
    "saw BASE / MODEL" if s else "saw MODEL / BASE" for s in swaps
  ]
  assert [r["id"] for r in records] == [c["id"] for c in CASES]

  always_a = lambda cases: ["A"] * len(cases)  # noqa: E731
  tally, records = evaluation.win_rate(always_a, CASES, model, base, seed=seed)
  assert [r["outcome"] for r in records] == ["loss" if s else "win" for s in swaps]
  assert [r["judge_output"] for r in records] == [""] * n
  assert tally == {
    "wins": int((~swaps).sum()),
    "losses": int(swaps.sum()),
    "ties": 0,
    "win_rate": pytest.approx((~swaps).mean()),
  }
  tally, _ = evaluation.win_rate(lambda c: ["tie"] * len(c), CASES, model, base, seed=seed)
  assert tally["ties"] == n and tally["win_rate"] == 0.0  # a tie counts as a loss


# ----------------------------------------------------------------------------- synthetic data

CONFIG = sp.SyntheticPreferenceConfig(num_users=400)


@pytest.fixture(scope="module")
def synthetic():
  return sp.generate(CONFIG)


def test_cultures_have_distinct_modes_and_the_largest_is_the_population_s(synthetic):
  _, oracle = synthetic
  k, q = CONFIG.num_cultures, CONFIG.num_questions
  assert k <= 4 and oracle.preference.shape == (k, q, 4)
  np.testing.assert_allclose(oracle.preference.sum(-1), 1.0)
  modes = oracle.preference.argmax(-1)  # [K, Q]
  for question in range(q):
    assert len(set(modes[:, question])) == k
  np.testing.assert_allclose(oracle.preference.max(-1), CONFIG.mode_probability)
  largest = int(np.argmax(oracle.culture_weights))
  for question, text in enumerate(oracle.questions):
    assert oracle.population_reply(text) == modes[largest, question]


def test_chosen_replies_follow_the_culture_s_preference(synthetic):
  records, oracle = synthetic
  counts = collections.defaultdict(lambda: np.zeros(4))
  for record in records["sft"]:
    if not record["id"].endswith(":0"):  # the chat rows; ":1" are the lettered choices
      continue
    messages = json.loads(record["messages"])
    question = messages[1]["content"]
    q = oracle.question_index(question)
    assert messages[-1]["content"] == oracle.replies[q][record["chosen_option"]]
    counts[oracle.culture_of_profile[record["profile"]], q][record["chosen_option"]] += 1
  assert len(counts) == CONFIG.num_cultures * CONFIG.num_questions
  for (culture, q), seen in counts.items():
    n = seen.sum()
    p = oracle.preference[culture, q]
    tolerance = 5 * np.sqrt(p * (1 - p) / n)  # five binomial standard deviations
    assert np.all(np.abs(seen / n - p) <= tolerance), (culture, q, seen, p)
  # Pooled over every (culture, question), the modal reply's share is mode_probability.
  total = sum(counts.values())
  modal = sum(seen[oracle.preference[c, q].argmax()] for (c, q), seen in counts.items())
  assert abs(modal / total.sum() - CONFIG.mode_probability) < 4 * np.sqrt(0.21 / total.sum())


def test_dpo_pairs_reject_each_other_reply_once(synthetic):
  records, oracle = synthetic
  chosen = {r["conversation_id"]: r["chosen_option"] for r in records["sft"]}
  pairs = collections.defaultdict(list)
  for record in records["dpo"]:
    pairs[record["conversation_id"]].append(record)
  assert pairs.keys() == chosen.keys()
  for conversation, rows in pairs.items():
    assert len(rows) == 3
    q = int(rows[0]["question_id"][1:])
    replies = oracle.replies[q]
    assert {r["chosen"] for r in rows} == {replies[chosen[conversation]]}
    assert sorted(replies.index(r["rejected"]) for r in rows) == sorted(
      set(range(4)) - {chosen[conversation]}
    )
    assert json.loads(rows[0]["messages"])[-1] == {"role": "user", "content": oracle.questions[q]}


def test_every_record_has_exactly_the_interface_keys(synthetic):
  records, _ = synthetic
  for kind in ("sft", "dpo", "ca"):
    for record in records[kind]:
      assert tuple(record) == RECORD_KEYS, (kind, record["id"])
      assert record["source"] == "synthetic"


def test_generation_is_deterministic_in_the_seed(synthetic):
  records, oracle = synthetic
  again, oracle_again = sp.generate(CONFIG)
  assert again == records
  assert oracle_again.to_json() == oracle.to_json()
  other, _ = sp.generate(sp.SyntheticPreferenceConfig(num_users=400, seed=1))
  assert other["sft"] != records["sft"]
