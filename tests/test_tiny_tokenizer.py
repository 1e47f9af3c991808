"""The tiny byte-level BPE tokenizers (`cuma_jax.tiny.tokenizer`), Qwen3 and Llama 3 formats."""

import pytest

from cuma_jax.data import prompts
from cuma_jax.data.tokenize import render_prompt
from cuma_jax.tiny.tokenizer import build_tiny_tokenizer


@pytest.mark.parametrize("chat_format", ["llama3", "qwen3"])
def test_tiny_tokenizer_letters_vocab_and_round_trip(chat_tokenizer, wvb_examples, chat_format):
  tokenizer = chat_tokenizer(chat_format)
  assert len(tokenizer) <= 2048
  for letter in prompts.LETTERS:
    assert len(tokenizer.encode(letter, add_special_tokens=False)) == 1
  text = tokenizer.apply_chat_template(
    prompts.chat_messages(wvb_examples[0]["profile"], wvb_examples[0]["user"], "A"), tokenize=False
  )
  assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_qwen3_template_renders_like_qwen3(tmp_path):
  tok = build_tiny_tokenizer(["hello"], tmp_path)
  messages = prompts.chat_messages("S", "U", "B")
  assert tok.apply_chat_template(messages, tokenize=False) == (
    "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\nB<|im_end|>\n"
  )
  assert render_prompt(tok, messages[:2]) == (
    "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n"
  )
  assert tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True) == (
    "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
  )
  assert (tok.pad_token, tok.eos_token) == ("<|endoftext|>", "<|im_end|>")
