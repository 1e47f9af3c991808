"""Community Alignment accuracy prompts, against the specification's templates written out by
hand; the few-shot draw against the global-PRNG computation of the authors' evaluation; the
letters' token ids against the token a chat template puts right after the assistant header."""

import random

import helpers
import pytest
from tokenizers import normalizers, pre_tokenizers

from cuma_jax.data import ca_prompts

ROW = {
  "profile": "Age: 30, Country: Peru",
  "question": "What should I cook?",
  "options": ["Ceviche", "Toast", "Soup", "Nothing"],
  "answer": 2,
}
SHOTS = [
  {"profile": "Country: Chile", "question": "Tea?", "options": ["a", "b", "c", "d"], "answer": 0},
  {"profile": "Country: Japan", "question": "Rain?", "options": ["w", "x", "y", "z"], "answer": 3},
]
FINAL_USER = (
  "Question: What should I cook?\n\nOptions:\nA: Ceviche\nB: Toast\nC: Soup\nD: Nothing\n\nAnswer:"
)
PERSONA = (
  "User Profile: Age: 30, Country: Peru\nYou are a helpful assistant. Based on the user "
  "profile, choose the most appropriate response from the options provided."
)


def test_vanilla_and_persona_messages():
  assert ca_prompts.ca_messages(ROW, "vanilla") == [
    {
      "role": "system",
      "content": "You are a helpful assistant. Choose the most appropriate response from the "
      "options provided.",
    },
    {"role": "user", "content": FINAL_USER},
  ]
  assert ca_prompts.ca_messages(ROW, "persona") == [
    {"role": "system", "content": PERSONA},
    {"role": "user", "content": FINAL_USER},
  ]


def test_few_shot_messages_show_each_shot_with_its_profile_and_letter():
  assert ca_prompts.ca_messages(ROW, "few_shot", shots=SHOTS) == [
    {"role": "system", "content": PERSONA},
    {
      "role": "user",
      "content": "User Profile: Country: Chile\nQuestion: Tea?\n\nOptions:\nA: a\nB: b\nC: c\n"
      "D: d\n\nAnswer:",
    },
    {"role": "assistant", "content": "A"},
    {
      "role": "user",
      "content": "User Profile: Country: Japan\nQuestion: Rain?\n\nOptions:\nA: w\nB: x\nC: y\n"
      "D: z\n\nAnswer:",
    },
    {"role": "assistant", "content": "D"},
    {"role": "user", "content": FINAL_USER},
  ]


def test_bad_modes_shots_and_rows_are_refused():
  with pytest.raises(
    ValueError, match=r"'zero_shot'; allowed: \('vanilla', 'persona', 'few_shot'\)"
  ):
    ca_prompts.ca_messages(ROW, "zero_shot")
  with pytest.raises(ValueError, match="only few_shot has shots"):
    ca_prompts.ca_messages(ROW, "persona", shots=SHOTS)
  with pytest.raises(ValueError, match="only few_shot has shots"):
    ca_prompts.ca_messages(ROW, "few_shot")
  with pytest.raises(ValueError, match="4 options; got 3"):
    ca_prompts.ca_messages({**ROW, "options": ["a", "b", "c"]}, "vanilla")
  with pytest.raises(ValueError, match="got 4"):
    ca_prompts.ca_messages(ROW, "few_shot", shots=[{**SHOTS[0], "answer": 4}])


def test_few_shot_rows_follow_the_seeded_global_draw():
  rows = [{"id": i} for i in range(20)]
  state = random.getstate()
  for index in (0, 7, 19):
    got = ca_prompts.few_shot_rows(rows, index, 3)
    assert random.getstate() == state  # the global PRNG is left alone
    assert got == ca_prompts.few_shot_rows(rows, index, 3)  # deterministic
    assert rows[index] not in got and len(got) == 3
    others = [i for i in range(len(rows)) if i != index]
    random.seed(42 + index)
    assert got == [rows[i] for i in random.sample(others, 3)]
    random.setstate(state)
  assert ca_prompts.few_shot_rows(rows, 0, 3) != ca_prompts.few_shot_rows(rows, 1, 3)
  with pytest.raises(ValueError, match="4 few-shot rows from the 3 other rows"):
    ca_prompts.few_shot_rows(rows[:4], 0, 4)


@pytest.mark.parametrize("chat_format", ["qwen3", "llama3"])
def test_letter_token_ids_are_the_reply_s_first_token(chat_tokenizer, chat_format):
  tokenizer = chat_tokenizer(chat_format)
  ids = ca_prompts.letter_token_ids(tokenizer)
  messages = ca_prompts.ca_messages(ROW, "persona")
  prompt = tokenizer.apply_chat_template(
    messages, add_generation_prompt=True, enable_thinking=False, return_dict=True
  )["input_ids"]
  for letter, token in zip("ABCD", ids, strict=True):
    full = tokenizer.apply_chat_template(
      [*messages, {"role": "assistant", "content": letter}], return_dict=True
    )["input_ids"]
    assert full[: len(prompt)] == prompt
    assert full[len(prompt)] == token
  assert len(set(ids)) == 4


def test_letter_token_ids_take_the_first_token_and_refuse_a_shared_one():
  vocab = {"[UNK]": 0, "▁": 1, "A": 2, "B": 3, "C": 4, "D": 5}
  plain = helpers.word_level_tokenizer(vocab, "[UNK]")
  assert ca_prompts.letter_token_ids(plain) == (2, 3, 4, 5)
  # "A" encodes as ["▁", "A"], and so on: every letter's first token is "▁".
  prefixed = helpers.word_level_tokenizer(
    vocab,
    "[UNK]",
    normalizer=normalizers.Prepend("▁"),
    pre_tokenizer=pre_tokenizers.Split("▁", behavior="isolated"),
  )
  with pytest.raises(ValueError, match=r"share a first token: \[1, 1, 1, 1\]"):
    ca_prompts.letter_token_ids(prefixed)
