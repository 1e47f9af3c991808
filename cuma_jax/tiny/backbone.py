"""A tiny Qwen3-shaped backbone built locally, for the embedded default job (no download).

The random network is written as an ordinary Hugging Face checkpoint (config.json +
safetensors) through the same export path as real models, so everything downstream —
``load_pretrained``, the demographic encoder, the trainer — runs unchanged on it.
"""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import transformers

from cuma_jax import fingerprint, presets
from cuma_jax.data import ca_prompts, chat, profile_questions, prompts
from cuma_jax.data.pipeline import SurveyTables, make_dataset
from cuma_jax.data.tokenize import ChatEncoder
from cuma_jax.models.config import ModelConfig
from cuma_jax.models.pretrained import (
  build_decoder,
  dummy_inputs,
  load_pretrained,
  load_tokenizer,
  save_pretrained,
)
from cuma_jax.params import merge_params
from cuma_jax.tiny.tokenizer import build_tiny_tokenizer
from cuma_jax.training import loop
from cuma_jax.training.step import sft_objective

# The fixed part of the tiny Qwen3; width and depth come from the ``tiny_backbone`` section.
TINY_QWEN3 = dict(
  head_dim=16,
  max_position_embeddings=512,
  rms_norm_eps=1e-6,
  rope_theta=10000.0,
  tie_word_embeddings=True,
)


def tiny_qwen3_config(tiny_backbone, vocab_size: int, **token_ids) -> transformers.Qwen3Config:
  """The Hugging Face config of the tiny backbone a config's ``tiny_backbone`` section
  describes (``vocab_size``: the trained tokenizer's length, padded up to a multiple of
  ``tiny_backbone.vocab_multiple``)."""
  return transformers.Qwen3Config(
    **{
      **TINY_QWEN3,
      "hidden_size": tiny_backbone.hidden_size,
      "num_hidden_layers": tiny_backbone.num_layers,
      "intermediate_size": 2 * tiny_backbone.hidden_size,
      "num_attention_heads": tiny_backbone.num_heads,
      "num_key_value_heads": tiny_backbone.num_kv_heads,
    },
    vocab_size=-(-vocab_size // tiny_backbone.vocab_multiple) * tiny_backbone.vocab_multiple,
    **token_ids,
  )


def write_random_qwen3(directory: str, tokenizer, tiny_backbone, *, seed: int = 0) -> str:
  """Saves a randomly initialised tiny Qwen3 (and ``tokenizer``) to ``directory``."""
  hf_config = tiny_qwen3_config(
    tiny_backbone,
    len(tokenizer),
    pad_token_id=tokenizer.pad_token_id,
    eos_token_id=tokenizer.eos_token_id,
  )
  config = dataclasses.replace(
    ModelConfig.from_hf(hf_config), hf_config_json=hf_config.to_json_string()
  )
  module = build_decoder(config)
  params = nn.unbox(module.init(jax.random.key(seed), **dummy_inputs(module))["params"])
  save_pretrained(module, params, directory)
  tokenizer.save_pretrained(directory)
  return directory


def is_checkpoint(directory: str) -> bool:
  return os.path.isfile(os.path.join(directory, "config.json")) and any(
    f.endswith(".safetensors") for f in os.listdir(directory)
  )


def build_warmed_up(config, workdir: str, data, log=print) -> str:
  """The embedded default's backbone: a tiny Qwen3 given general competence locally.

  A random tiny Qwen3 and a BPE tokenizer are built from the survey's text, then fully
  fine-tuned for ``tiny_backbone.warmup_steps`` on the survey WITHOUT profiles in the prompt:
  it learns the answer format and the population's answers (mean collapse), which is the
  "base model" CuMA then specialises per culture.  With ``tiny_backbone.warmup=
  "profile_reading"`` questions about each training profile's own fields, asked under that
  profile, are mixed in: the base also learns to read a profile, never what it implies for
  the survey.  For the preference task it is fine-tuned
  on the chat SFT rows, each shown under ANOTHER user's profile: it learns the chat format
  and that a profile is there, but not what it implies (the population's preferred replies).  Cached in ``workdir/tiny_backbone_<key>``,
  the key being a digest of the prepared data and the warm-up settings, so changing either
  builds a new backbone instead of reusing one made from other inputs.
  """
  key = fingerprint.digest(
    {"data": fingerprint.fingerprint(data.directory), "warmup": _warmup_settings(config)}
  )
  cache = os.path.join(workdir, f"tiny_backbone_{key}")
  final = os.path.join(cache, "warmed_up")
  if is_checkpoint(final):
    log(f"reusing the warmed-up tiny backbone in {final} (same data and warm-up settings)")
    return final
  random_dir = os.path.join(cache, "random")
  preference = config.task == "preference"
  if not is_checkpoint(random_dir):
    corpus = (
      _preference_corpus(data.sources) if preference else _survey_corpus(data.sources["train"])
    )
    tokenizer = build_tiny_tokenizer(corpus, random_dir, vocab_size=config.tiny_backbone.vocab_size)
    write_random_qwen3(random_dir, tokenizer, config.tiny_backbone, seed=config.seed)
  warm = presets.warmup_config(config)
  reading = warm.tiny_backbone.warmup == "profile_reading"
  log(
    f"warm-up: full fine-tuning of the tiny backbone for {warm.train.num_steps} steps "
    + (
      "on the chat SFT rows, each under another user's profile"
      if preference
      else "on the survey without profiles"
      + (", mixed with questions about each profile's own fields" if reading else "")
    )
  )
  module, params = load_pretrained(random_dir)
  tokenizer = load_tokenizer(random_dir)
  objective = None
  if preference:
    p = warm.preference
    dataset = chat.make_chat_dataset(
      "sft",
      data.sources["sft_train"],
      tokenizer,
      chat.Lengths(warm.data.max_length, p.max_prompt_length, p.max_completion_length),
      batch_size=warm.data.batch_size,
      profile_blind=True,
      seed=warm.data.shuffle_seed,
      num_epochs=None,
    )
    objective = sft_objective(
      module, lambda_aux=0.0, label_smoothing=0.0, max_targets=p.max_completion_length
    )
  else:
    questions = _profile_questions(data.sources["train"]) if reading else None
    dataset, _ = make_dataset(
      data.sources["train"],
      tokenizer,
      # Never cut a profile question's prompt: its first tokens are the profile it asks about.
      max_length=max(warm.data.max_length, _longest(questions, tokenizer) if reading else 0),
      batch_size=warm.data.batch_size,
      seed=warm.data.shuffle_seed,
      num_epochs=None,
      demographic_system_prompt=False,
      profile_questions=questions,
    )
  result = loop.train(
    warm,
    os.path.join(cache, "warmup"),
    module,
    params,
    dataset,
    num_steps=warm.train.num_steps,
    objective=objective,
    log=log,
  )
  save_pretrained(module, merge_params(result.trainable, result.frozen), final + ".tmp")
  tokenizer.save_pretrained(final + ".tmp")
  os.replace(final + ".tmp", final)
  return final


def _profile_questions(train_source) -> profile_questions.ProfileQuestions:
  """Questions about the training profiles' own fields."""
  records = train_source.__getitems__(range(len(train_source)))
  return profile_questions.ProfileQuestions(profile_questions.profile_fields(records))


def _longest(questions: profile_questions.ProfileQuestions, tokenizer) -> int:
  """Tokens of the longest profile question with its answer."""
  encoder = ChatEncoder(tokenizer, max_length=1)
  lengths = (encoder.tokens(prompts.chat_messages(q.system, q.user), q.answer) for q in questions)
  return max(len(prompt) + len(answer) for prompt, answer in lengths)


def _warmup_settings(config) -> dict:
  """Every setting the warmed-up weights depend on besides the data."""
  warm = presets.warmup_config(config)
  return {
    "seed": warm.seed,
    "tiny_backbone": warm.tiny_backbone.to_dict(),
    "optim": warm.optim.to_dict(),
    "max_length": warm.data.max_length,
    "shuffle_seed": warm.data.shuffle_seed,
    "task": warm.task,
    "preference_lengths": (
      warm.preference.max_prompt_length,
      warm.preference.max_completion_length,
    ),
    **(
      {"profile_questions": profile_questions.FORMAT}
      if warm.tiny_backbone.warmup == "profile_reading"
      else {}
    ),
  }


def _preference_corpus(sources):
  """Every text of the training conversations and the 4-way choice prompts."""
  train = sources["sft_train"]
  for record in train.__getitems__(range(len(train))):
    for message in chat.messages_of(record):
      yield message["content"]
  yield ca_prompts.VANILLA_SYSTEM_PROMPT
  yield ca_prompts.PERSONA_SYSTEM_PROMPT


def _survey_corpus(source):
  """Every text the prompts are made of: questions/options, profiles, system prompts."""
  for question in source.dataset_info.metadata["questions"]:
    yield question["text"] + " " + " ".join(question["option_texts"])
  yield from SurveyTables.of(source).profiles
  yield prompts.DEFAULT_SYSTEM_PROMPT
  yield prompts.INSTRUCTION
