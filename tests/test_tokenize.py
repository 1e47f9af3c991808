"""Chat-template label construction (Qwen3 and Llama 3 formats) on the tiny tokenizers."""

import ml_collections
import numpy as np
import pytest

from cuma_jax import presets, schema
from cuma_jax.data import prompts
from cuma_jax.data.tokenize import ChatEncoder, pad_id, render_prompt
from cuma_jax.tiny.tokenizer import build_tiny_tokenizer

# chat_format -> its end-of-turn token
FORMATS = {"qwen3": "<|im_end|>", "llama3": "<|eot_id|>"}
# chat_format -> the released scripts' assistant marker (their labels start after it)
RELEASED_MARKERS = {
  "qwen3": "<|im_start|>assistant\n<think>\n\n</think>\n\n",
  "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
}


@pytest.fixture(scope="module", params=sorted(FORMATS))
def chat_format(request):
  return request.param


@pytest.fixture(scope="module")
def tokenizer(chat_tokenizer, chat_format):
  return chat_tokenizer(chat_format)


@pytest.mark.parametrize("demographic", [False, True])
def test_only_letter_and_end_of_turn_are_supervised(
  chat_format, tokenizer, wvb_examples, demographic
):
  end_of_turn = FORMATS[chat_format]
  encoder = ChatEncoder(tokenizer, max_length=192)
  for example in wvb_examples:
    system = prompts.system_prompt(example["profile"], demographic)
    messages = prompts.chat_messages(system, example["user"])
    out = encoder(messages, example["answer_letter"])
    mask = out["loss_mask"].astype(bool)
    assert tokenizer.decode(out["targets"][mask]) == example["answer_letter"] + end_of_turn
    assert mask.sum() == 2
    p = int(out["prompt_length"])
    assert mask[p] and not mask[:p].any()
    # The prompt part is exactly what evaluation renders; the answer follows it.
    assert tokenizer.decode(out["input_ids"][: p + 1]) == render_prompt(tokenizer, messages)
    assert tokenizer.decode(out["targets"][p : p + 1]) == example["answer_letter"]
    n = int(out["attention_mask"].sum())
    assert n == p + 3 and out["attention_mask"][:n].all()
    assert (out["input_ids"][n:] == pad_id(tokenizer)).all()
    np.testing.assert_array_equal(out["targets"][: n - 1], out["input_ids"][1:n])
    assert out["truncated_tokens"] == 0


def _released_labels(tokenizer, messages, answer, marker):
  """The released training's supervised labels, written here from its description: the chat
  template's text of the answered conversation, labels after the last assistant marker, and
  every label equal to the padding id masked (a tokenizer without one pads with EOS)."""
  text = tokenizer.apply_chat_template(
    [*messages, {"role": "assistant", "content": answer}], tokenize=False
  )
  ids = tokenizer.encode(text, add_special_tokens=False)
  marker_ids = tokenizer.encode(marker, add_special_tokens=False)
  start = max(i for i in range(len(ids)) if ids[i : i + len(marker_ids)] == marker_ids)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  return ids, [t for t in ids[start + len(marker_ids) :] if t != pad]


def test_released_supervision(chat_format, tokenizer, wvb_examples):
  encoder = ChatEncoder(tokenizer, max_length=192, supervision="released")
  expected = {"qwen3": "{}<|im_end|>\n", "llama3": "{}"}[chat_format]
  for example in wvb_examples[:6]:
    messages = prompts.chat_messages(example["profile"], example["user"])
    letter = example["answer_letter"]
    out = encoder(messages, letter)
    supervised = out["targets"][out["loss_mask"].astype(bool)].tolist()
    ids, labels = _released_labels(tokenizer, messages, letter, RELEASED_MARKERS[chat_format])
    assert supervised == labels
    assert tokenizer.decode(supervised) == expected.format(letter)
    n = int(out["attention_mask"].sum())
    assert out["input_ids"][:n].tolist() == ids
    # Evaluation reads the same position whichever tokens are supervised.
    p = int(out["prompt_length"])
    assert tokenizer.decode(out["targets"][p : p + 1]) == letter and out["loss_mask"][p]


def test_supervision_choices_are_checked(tokenizer):
  with pytest.raises(ValueError, match=r"supervision='letter'.*'answer_and_end_of_turn'"):
    ChatEncoder(tokenizer, 64, supervision="letter")
  c = ml_collections.ConfigDict(presets.experiment_config("cuma", "tiny").to_dict())
  assert c.data.supervision == "answer_and_end_of_turn"
  c.data.supervision = "letter"
  with pytest.raises(ValueError, match=r"config\.data\.supervision='letter'.*'released'"):
    schema.validate(c)


def test_left_truncation_keeps_the_answer(chat_format, tokenizer, wvb_examples):
  example = wvb_examples[0]
  messages = prompts.chat_messages(example["profile"], example["user"])
  full = ChatEncoder(tokenizer, max_length=256)(messages, "A")
  n = int(full["attention_mask"].sum())
  short = ChatEncoder(tokenizer, max_length=20)(messages, "A")
  assert short["truncated_tokens"] == n - 20
  assert short["attention_mask"].all()
  np.testing.assert_array_equal(short["input_ids"], full["input_ids"][n - 20 : n])
  assert short["prompt_length"] == 17
  supervised = short["targets"][short["loss_mask"].astype(bool)]
  assert tokenizer.decode(supervised) == "A" + FORMATS[chat_format]


def test_template_whose_answer_rendering_disagrees_with_the_prompt_is_rejected(tmp_path):
  tok = build_tiny_tokenizer(["hello"], tmp_path)
  # Generation prompt with a think block, answers rendered without one: prompts would differ.
  tok.chat_template = (
    "{%- for m in messages -%}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "'<|im_end|>\\n' -}}{%- endfor -%}{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
  )
  with pytest.raises(ValueError, match="renders the conversation with its answer differently"):
    ChatEncoder(tok, 64)(prompts.chat_messages("S", "U"), "A")
