"""Chat SFT, DPO and prompt arrays of preference records, against the tokenizer's own chat
template: the whole conversation rendered by ``apply_chat_template``, cut by hand after the
LAST assistant header, each side tokenised alone."""

import json

import numpy as np
import pytest

from cuma_jax.data import chat
from cuma_jax.data.preference_sources import make_record

# What each chat format writes before a reply, and the token that ends the reply.
HEADERS = {
  "qwen3": ("<|im_start|>assistant\n<think>\n\n</think>\n\n", "<|im_end|>"),
  "llama3": ("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
}
PROFILES = ("Country: Japan, Age: 25-34", "Country: Peru, Gender: Female")
THREAD = [
  {"role": "system", "content": f"User Profile: {PROFILES[0]}"},
  {"role": "user", "content": "How should I spend a free Sunday?"},
  {"role": "assistant", "content": "Visit your family and have lunch together."},
  {"role": "user", "content": "And in the evening?"},
  {"role": "assistant", "content": "Rest at home with a book."},
]
PROMPT = [
  {"role": "system", "content": f"User Profile: {PROFILES[1]}"},
  {"role": "user", "content": "What should I cook for guests?"},
  {"role": "assistant", "content": "A rice dish."},
  {"role": "user", "content": "Something lighter?"},
]
CHOSEN, REJECTED = "Fresh salads with lemon.", "Roast meat."
# A thread whose prompt and reply both outgrow the truncation tests' lengths.
LONG_THREAD = [
  THREAD[0],
  {"role": "user", "content": " ".join(["Tell me about the weather and the family dinner."] * 6)},
  {"role": "assistant", "content": " ".join(["Rest at home with a book."] * 4)},
]
LENGTHS = chat.Lengths(max_length=160, max_prompt=140, max_completion=20)


def _record(conversation, profile, messages, **fields):
  return make_record(
    "synthetic", conversation, 0, profile=profile, messages=json.dumps(messages), **fields
  )


SFT = [
  _record("c0", PROFILES[0], THREAD),
  _record("c1", PROFILES[1], [*PROMPT[:2], {"role": "assistant", "content": "A big soup."}]),
]
DPO = [_record("c1", PROFILES[1], PROMPT, chosen=CHOSEN, rejected=REJECTED)]


def _split(tokenizer, chat_format, messages):
  """(ids of everything up to the last assistant header, ids of the final reply and its
  end-of-turn token): the oracle of what is prompt and what is supervised."""
  header, end = HEADERS[chat_format]
  text = tokenizer.apply_chat_template(messages, tokenize=False)
  cut = text.rindex(header) + len(header)
  prompt = tokenizer.encode(text[:cut], add_special_tokens=False)
  rest = tokenizer.encode(text[cut:], add_special_tokens=False)
  return prompt, rest[: rest.index(tokenizer.convert_tokens_to_ids(end)) + 1]


def _one_batch(kind, source, tokenizer, lengths=LENGTHS, profiles=PROFILES, **kwargs):
  dataset = chat.make_chat_dataset(
    kind,
    source,
    tokenizer,
    lengths,
    batch_size=len(source),
    profiles=profiles,
    shuffle=False,
    drop_remainder=False,
    **kwargs,
  )
  return next(iter(dataset))


def _check_row(arrays, prompt, completion, length):
  """One right-padded row holds prompt + completion, supervises exactly the completion."""
  ids = prompt + completion
  n = len(ids)
  np.testing.assert_array_equal(arrays["input_ids"][:n], ids)
  np.testing.assert_array_equal(arrays["attention_mask"], np.arange(length) < n)
  np.testing.assert_array_equal(arrays["targets"][: n - 1], arrays["input_ids"][1:n])
  np.testing.assert_array_equal(np.flatnonzero(arrays["loss_mask"]), range(len(prompt) - 1, n - 1))
  np.testing.assert_array_equal(arrays["targets"][arrays["loss_mask"] == 1], completion)


@pytest.mark.parametrize("chat_format", ["qwen3", "llama3"])
def test_sft_supervises_only_the_final_reply_of_a_thread(chat_tokenizer, chat_format):
  tokenizer = chat_tokenizer(chat_format)
  batch = _one_batch("sft", SFT, tokenizer)
  for index, record in enumerate(SFT):
    messages = json.loads(record["messages"])
    prompt, completion = _split(tokenizer, chat_format, messages)
    row = {k: v[index] for k, v in batch.items()}
    _check_row(row, prompt, completion, LENGTHS.max_length)
    # The supervised text is the last reply and its end-of-turn, never an earlier reply.
    supervised = tokenizer.decode(row["targets"][row["loss_mask"] == 1])
    assert supervised == messages[-1]["content"] + HEADERS[chat_format][1]
    assert row["truncated_tokens"] == 0
  assert "Visit your family" in tokenizer.decode(batch["input_ids"][0])  # in the prompt only
  assert batch["profile_index"].tolist() == [0, 1]
  assert batch["example_index"].tolist() == [0, 1]


def _first_row(source, tokenizer, lengths):
  return {k: v[0] for k, v in _one_batch("sft", source, tokenizer, lengths).items()}


def test_sft_truncation_keeps_the_prompt_end_and_the_reply_start(chat_tokenizer):
  tokenizer = chat_tokenizer("qwen3")
  messages = LONG_THREAD
  prompt, completion = _split(tokenizer, "qwen3", messages)
  assert len(prompt) > 36 and len(completion) > 7
  lengths = chat.Lengths(max_length=40, max_prompt=36, max_completion=7)
  row = _first_row([_record("c", PROFILES[0], messages)], tokenizer, lengths)
  kept = 40 - 7  # what fits beside the 7 completion tokens (less than max_prompt)
  _check_row(row, prompt[-kept:], completion[:7], 40)
  assert tokenizer.decode(prompt[-kept:]).endswith(HEADERS["qwen3"][0])
  assert row["truncated_tokens"] == len(prompt) - kept + len(completion) - 7

  # A short reply: the prompt keeps max_prompt tokens.
  short = [*messages[:2], {"role": "assistant", "content": "Yes."}]
  prompt, completion = _split(tokenizer, "qwen3", short)
  lengths = chat.Lengths(max_length=40, max_prompt=20, max_completion=7)
  row = _first_row([_record("c", PROFILES[0], short)], tokenizer, lengths)
  _check_row(row, prompt[-20:], completion, 40)
  assert row["truncated_tokens"] == len(prompt) - 20


def test_released_sft_truncation_cuts_the_whole_thread_at_its_end(chat_tokenizer):
  # The released chat SFT tokenises the whole thread and right-truncates it at max_length: a
  # long thread keeps its prompt's start and loses its reply's end, or all of the reply.
  tokenizer = chat_tokenizer("qwen3")
  messages = LONG_THREAD
  prompt, completion = _split(tokenizer, "qwen3", messages)
  record = [_record("c", PROFILES[0], messages)]
  length = len(prompt) + 5  # room for the prompt and 5 reply tokens
  lengths = chat.Lengths(max_length=length, max_prompt=20, max_completion=len(completion))
  batch = _one_batch("sft", record, tokenizer, lengths, truncation="thread_end")
  row = {k: v[0] for k, v in batch.items()}
  _check_row(row, prompt, completion[:5], length)
  assert row["truncated_tokens"] == len(completion) - 5

  # A prompt longer than max_length: its first tokens, and nothing is supervised.
  lengths = chat.Lengths(max_length=30, max_prompt=20, max_completion=7)
  row = {
    k: v[0]
    for k, v in _one_batch("sft", record, tokenizer, lengths, truncation="thread_end").items()
  }
  np.testing.assert_array_equal(row["input_ids"], prompt[:30])
  assert row["loss_mask"].sum() == 0
  assert row["truncated_tokens"] == len(prompt) - 30 + len(completion)
  with pytest.raises(ValueError, match="truncation='end'; allowed"):
    _one_batch("sft", record, tokenizer, lengths, truncation="end")
  with pytest.raises(ValueError, match="kind='sft' only"):
    _one_batch("dpo", DPO, tokenizer, truncation="thread_end")


def test_lengths_refuse_a_completion_that_leaves_no_room_for_the_prompt():
  """With max_completion >= max_length a full completion leaves no prompt token (the
  generation header would be lost); Lengths promises that a prompt and a completion fit."""
  with pytest.raises(ValueError):
    chat.Lengths(max_length=8, max_prompt=4, max_completion=8)


@pytest.mark.parametrize("chat_format", ["qwen3", "llama3"])
def test_dpo_rows_share_the_prompt_and_complete_it_with_each_reply(chat_tokenizer, chat_format):
  tokenizer = chat_tokenizer(chat_format)
  batch = _one_batch("dpo", DPO, tokenizer)
  assert batch["input_ids"].shape == (1, 2, LENGTHS.max_length)
  for side, reply in enumerate((CHOSEN, REJECTED)):
    messages = [*PROMPT, {"role": "assistant", "content": reply}]
    prompt, completion = _split(tokenizer, chat_format, messages)
    _check_row({k: v[0, side] for k, v in batch.items() if v.ndim == 3}, prompt, completion, 160)
    assert tokenizer.decode(completion) == reply + HEADERS[chat_format][1]
  start = np.argmax(batch["loss_mask"][0], axis=-1)
  assert start[0] == start[1]
  np.testing.assert_array_equal(
    batch["input_ids"][0, 0, : start[0] + 1], batch["input_ids"][0, 1, : start[1] + 1]
  )
  assert batch["profile_index"].tolist() == [1] and batch["truncated_tokens"].tolist() == [0]


@pytest.mark.parametrize("chat_format", ["qwen3", "llama3"])
def test_prompt_rows_are_the_generation_prompt_right_padded(chat_tokenizer, chat_format):
  tokenizer = chat_tokenizer(chat_format)
  source = [*DPO, _record("c2", PROFILES[0], THREAD[:2], chosen="x", rejected="y")]
  batch = _one_batch("prompt", source, tokenizer)
  width = LENGTHS.max_prompt
  assert batch["input_ids"].shape == (2, width)
  # Llama 3's tokenizer has no padding token: rows are padded with its end-of-turn token.
  pad = tokenizer.convert_tokens_to_ids(
    {"qwen3": "<|endoftext|>", "llama3": "<|eot_id|>"}[chat_format]
  )
  for row, record in enumerate(source):
    expected = tokenizer.apply_chat_template(
      json.loads(record["messages"]),
      add_generation_prompt=True,
      enable_thinking=False,
      return_dict=True,
    )["input_ids"]
    n = len(expected)
    np.testing.assert_array_equal(batch["input_ids"][row, :n], expected)
    np.testing.assert_array_equal(batch["attention_mask"][row], np.arange(width) < n)
    assert (batch["input_ids"][row, n:] == pad).all()
  assert batch["profile_index"].tolist() == [1, 0]
  assert batch["example_index"].tolist() == [0, 1]
  assert batch["truncated_tokens"].tolist() == [0, 0]


@pytest.mark.parametrize(
  "owners",
  [(0, 1, 2, 3), (0, 0, 0, 1, 1, 1)],
  ids=["four_users", "two_users_three_rows_each"],
)
def test_profile_blind_sft_shows_another_profile(chat_tokenizer, owners):
  """Every row's system turn names another user's profile, never the row's own (the
  profiles differ), and only its system turn changes."""
  tokenizer = chat_tokenizer("qwen3")
  profiles = [f"Country: Japan, Age: {20 + i}" for i in range(max(owners) + 1)]
  source = []
  for row, owner in enumerate(owners):
    messages = [
      {"role": "system", "content": f"User Profile: {profiles[owner]}"},
      {"role": "user", "content": f"Question {row}?"},
      {"role": "assistant", "content": "Rest at home."},
    ]
    source.append(_record(f"c{row}", profiles[owner], messages))
  batch = _one_batch("sft", source, tokenizer, profiles=sorted(profiles), profile_blind=True)
  shown = []
  for row in range(len(owners)):
    arrays = {k: v[row] for k, v in batch.items()}
    text = tokenizer.decode(arrays["input_ids"][arrays["attention_mask"] == 1])
    named = [p for p in profiles if f"User Profile: {p}<|im_end|>" in text]
    assert len(named) == 1, text
    shown.append(profiles.index(named[0]))
    messages = json.loads(source[row]["messages"])
    messages[0]["content"] = f"User Profile: {named[0]}"
    prompt, completion = _split(tokenizer, "qwen3", messages)
    _check_row(arrays, prompt, completion, LENGTHS.max_length)
  assert all(s != o for s, o in zip(shown, owners, strict=True)), (
    f"rows show profiles {shown}, own {owners}"
  )
