"""Tiny offline tokenizers with Qwen3's (or Llama 3's) special tokens and chat format.

Tests and smoke runs need a tokenizer that behaves like the real ones at the points the data
pipeline depends on (special tokens, chat template, one token per option letter, exact decoding)
without downloading anything. This builds a byte-level BPE like Qwen's (same pre-tokenisation
regex, so every byte, hence every letter A..Z, is a token and decoding round-trips exactly),
trained on a small corpus, and saves it so `AutoTokenizer.from_pretrained(out_dir)` reloads it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Qwen2/Qwen3's pre-tokenisation pattern (tokenizer.json of the released models).
_SPLIT_PATTERN = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
  r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen3's behaviour: every turn is <|im_start|>{role}\n{content}<|im_end|>\n; the final
# assistant turn carries an empty think block; the generation prompt opens an assistant turn
# and, with enable_thinking=False, adds the empty think block too.
QWEN3_CHAT_TEMPLATE = (
  "{%- for message in messages -%}"
  "{%- if message['role'] == 'assistant' and loop.last -%}"
  "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message['content']"
  " + '<|im_end|>\\n' -}}"
  "{%- else -%}"
  "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
  "{%- endif -%}"
  "{%- endfor -%}"
  "{%- if add_generation_prompt -%}"
  "{{- '<|im_start|>assistant\\n' -}}"
  "{%- if enable_thinking is defined and enable_thinking is false -%}"
  "{{- '<think>\\n\\n</think>\\n\\n' -}}"
  "{%- endif -%}"
  "{%- endif -%}"
)

# Llama 3 Instruct's template: no newline after <|eot_id|>, BOS before the first turn.
LLAMA3_CHAT_TEMPLATE = (
  "{%- for message in messages -%}"
  "{%- if loop.first -%}{{- bos_token -}}{%- endif -%}"
  "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
  " + message['content'] | trim + '<|eot_id|>' -}}"
  "{%- endfor -%}"
  "{%- if add_generation_prompt -%}"
  "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
  "{%- endif -%}"
)

# chat_format -> (special tokens, non-special added tokens, roles of the specials, template)
_FORMATS = {
  "qwen3": (
    ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    ["<think>", "</think>"],
    {"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>"},
    QWEN3_CHAT_TEMPLATE,
  ),
  "llama3": (
    [
      "<|begin_of_text|>",
      "<|end_of_text|>",
      "<|start_header_id|>",
      "<|end_header_id|>",
      "<|eot_id|>",
      "<|finetune_right_pad_id|>",
    ],
    [],
    # As Llama 3.x Instruct's own tokenizer: no padding token (users pad with EOS).
    {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    LLAMA3_CHAT_TEMPLATE,
  ),
}

_TEMPLATE_WORDS = "system user assistant\n\n"


def build_tiny_tokenizer(
  corpus_texts: Iterable[str],
  out_dir: str | Path,
  *,
  vocab_size: int = 1024,
  chat_format: str = "qwen3",
) -> PreTrainedTokenizerFast:
  """Trains a byte-level BPE on `corpus_texts`, saves it to `out_dir` and returns it.

  vocab_size counts the 256 byte tokens, the merges and the special tokens.
  """
  specials, plain_added, roles, template = _FORMATS[chat_format]
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]
  )
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=[AddedToken(t, special=True, normalized=False) for t in specials],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tokenizer.train_from_iterator(_with_template_words(corpus_texts), trainer)
  tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain_added])

  hf_tokenizer = PreTrainedTokenizerFast(
    tokenizer_object=tokenizer, chat_template=template, model_max_length=1 << 20, **roles
  )
  hf_tokenizer.save_pretrained(str(out_dir))
  return hf_tokenizer


def _with_template_words(texts: Iterable[str]) -> Iterable[str]:
  yield _TEMPLATE_WORDS
  yield from texts
