"""The local LM judge and the GRPO reward: prompts as the tokenizer's own chat template gives
them, replies as Hugging Face's greedy `generate` (torch) gives them, verdicts parsed from those.

Tiny random Qwen3 and Llama checkpoints are built here with the tiny chat tokenizers (whose
vocabulary is larger than the shared fixtures' tiny models), in one directory each, as a judge
checkpoint is laid out.
"""

from conftest import TINY, TINY_MODELS
from jax import numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from cuma_jax import generation
from cuma_jax.evaluation import judging
from cuma_jax.models.pretrained import load_pretrained, load_tokenizer
from cuma_jax.tiny.tokenizer import build_tiny_tokenizer

CASES = [
  judging.Case("Country: Peru, Age: 30", "What should I cook tonight?", "Ceviche.", "Toast."),
  judging.Case("", "Hi", "Hello there, how can I help you today?", "Hi."),
  judging.Case(
    "Country: Japan, Gender: Female, Education: University",
    "Which holiday matters most to my family?",
    "New Year, with the whole family visiting the shrine together.",
    "Any day off work.",
  ),
]
DEMOS = [judging.Case("Country: Chile", "Is tea or coffee better?", "Tea is.", "Neither.")]


@pytest.fixture(scope="module")
def judge_checkpoint(tmp_path_factory):
  """Returns a function name -> (directory, torch model): a tokenizer and a random model
  sized to it, saved together; Qwen3's generation config ends replies at two ids."""
  cache = {}

  def get(name):
    if name not in cache:
      directory = tmp_path_factory.mktemp(f"judge_{name}")
      corpus = [judging.JUDGE_SYSTEM_PROMPT, judging.QUESTION] + [
        judging.judge_user_prompt(c) for c in CASES
      ]
      tokenizer = build_tiny_tokenizer(corpus, directory, vocab_size=400, chat_format=name)
      eos = tokenizer.eos_token_id
      eos = [eos, tokenizer.convert_tokens_to_ids("<|endoftext|>")] if name == "qwen3" else eos
      config_cls, model_cls, extra = TINY_MODELS[name]
      config = config_cls(
        **{**TINY, **extra, "vocab_size": len(tokenizer), "max_position_embeddings": 1024},
        eos_token_id=eos,
      )
      torch.manual_seed(0)
      model = model_cls(config).eval()
      model.save_pretrained(directory)
      cache[name] = (str(directory), model)
    return cache[name]

  return get


def _hugging_face_replies(model, tokenizer, prompts, stop_tokens, max_new_tokens=16):
  """Greedy `generate` of each prompt alone (no padding), cut after its first stop token."""
  replies = []
  for ids in prompts:
    with torch.no_grad():
      out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=list(stop_tokens),
        pad_token_id=tokenizer.eos_token_id,
      )[0, len(ids) :].tolist()
    end = next((i + 1 for i, t in enumerate(out) if t in stop_tokens), len(out))
    replies.append(out[:end])
  return replies


def test_judge_messages_are_the_system_prompt_and_the_user_prompt():
  assert judging.judge_messages(CASES[0], DEMOS) == [
    {"role": "system", "content": judging.JUDGE_SYSTEM_PROMPT},
    {"role": "user", "content": judging.judge_user_prompt(CASES[0], DEMOS)},
  ]


def test_reward_from_verdict_scores_the_candidate_shown_as_b():
  rewards = {v: judging.reward_from_verdict(v) for v in ("A", "B", "tie")}
  assert rewards == {"A": 0.0, "B": 1.0, "tie": 0.5}
  with pytest.raises(ValueError, match="verdict 'Tie'"):
    judging.reward_from_verdict("Tie")


@pytest.mark.parametrize("name", ["qwen3", pytest.param("llama3", marks=pytest.mark.slow)])
def test_local_judge_equals_chat_template_and_hugging_face_greedy(judge_checkpoint, name):
  directory, torch_model = judge_checkpoint(name)
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
  judge = judging.LocalLMJudge(directory, demonstrations=DEMOS, batch_size=2)
  assert judge.sampling.max_new_tokens == 16 and judge.sampling.temperature == 0
  end = [tokenizer.eos_token_id]
  if name == "qwen3":  # the generation config's second end id joins the tokenizer's EOS
    end.append(tokenizer.convert_tokens_to_ids("<|endoftext|>"))
  assert judge.sampling.stop_tokens == tuple(end)

  conversations = [judging.judge_messages(c, DEMOS) for c in CASES]
  expected_ids = [
    tokenizer.apply_chat_template(
      m, add_generation_prompt=True, enable_thinking=False, return_dict=True
    )["input_ids"]
    for m in conversations
  ]
  assert judge.encode(conversations) == expected_ids
  assert len({len(ids) for ids in expected_ids}) == len(CASES)  # unequal: padding is exercised

  verdicts = judge(CASES)  # two batches, the second one padded with a repeated row
  replies = _hugging_face_replies(torch_model, tokenizer, expected_ids, end)
  texts = [tokenizer.decode(r, skip_special_tokens=True) for r in replies]
  assert judge.last_outputs == texts
  assert all(texts) and len(set(texts)) > 1  # real replies, not one constant
  assert verdicts == [judging.parse_verdict(t) for t in texts]


@pytest.mark.slow
def test_local_judge_stops_at_its_stop_tokens(judge_checkpoint):
  directory, torch_model = judge_checkpoint("qwen3")
  module, params = load_pretrained(directory, jnp.float32)
  tokenizer = load_tokenizer(directory)
  prompts = [
    tokenizer.apply_chat_template(
      judging.judge_messages(c), add_generation_prompt=True, enable_thinking=False, return_dict=True
    )["input_ids"]
    for c in CASES
  ]
  free = _hugging_face_replies(torch_model, tokenizer, prompts, [tokenizer.eos_token_id])
  stop = free[0][3]  # case 0 replies with it at step 3 (others may too, or earlier)
  judge = judging.LocalLMJudge.from_loaded(module, params, tokenizer, stop_tokens=(stop,))
  assert judge.batch_size == 8 and judge.demonstrations == ()
  verdicts = judge(CASES)
  replies = _hugging_face_replies(torch_model, tokenizer, prompts, [stop])
  assert len(replies[0]) <= 4 < len(free[0])
  assert judge.last_outputs == [tokenizer.decode(r, skip_special_tokens=True) for r in replies]
  assert verdicts == [judging.parse_verdict(t) for t in judge.last_outputs]
  # Loaded without a directory, the judge ends replies at the tokenizer's EOS.
  default = judging.LocalLMJudge.from_loaded(module, params, tokenizer)
  assert default.sampling.stop_tokens == (tokenizer.eos_token_id,)


def test_local_judge_keeps_case_order_across_batches(judge_checkpoint, monkeypatch):
  """With a stand-in generator that answers from each row's own prompt, every case gets its
  own reply back, whatever the length sorting and the batch's repeated filler rows."""
  tokenizer = load_tokenizer(judge_checkpoint("qwen3")[0])
  answers = {"Ceviche.": "[[B]] x", "Hello there": "[[A]]", "New Year": "no marker"}

  def fake_generate(module, params, ids, mask, sampling):
    rows = []
    for row_ids, row_mask in zip(ids, mask, strict=True):
      prompt = tokenizer.decode(row_ids[row_mask == 1])
      reply = next(a for key, a in answers.items() if key in prompt)
      rows.append(tokenizer.encode(reply) + [sampling.stop_tokens[0]])
    width = max(map(len, rows)) + 2
    tokens = np.full((len(rows), width), sampling.pad_token, np.int32)
    for k, r in enumerate(rows):
      tokens[k, : len(r)] = r
    return generation.Generation(tokens, np.array([len(r) for r in rows]), None)

  monkeypatch.setattr(judging, "generate", fake_generate)
  judge = judging.LocalLMJudge.from_loaded(None, None, tokenizer, batch_size=2)
  assert judge(CASES) == ["B", "A", "tie"]
  assert judge.last_outputs == ["[[B]] x", "[[A]]", "no marker"]
  assert judge([]) == [] and judge.last_outputs == []
