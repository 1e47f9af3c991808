"""Loading from a checkpoint directory: the tokenizer, chat template included."""

import helpers

from cuma_jax.models.pretrained import load_tokenizer


def test_tokenizer_loads_from_the_checkpoint_directory(tmp_path):
  fast = helpers.word_level_tokenizer({"<unk>": 0, "hello": 1, "world": 2}, "<unk>")
  fast.chat_template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
  fast.save_pretrained(tmp_path)
  loaded = load_tokenizer(tmp_path)
  assert loaded.encode("hello world", add_special_tokens=False) == [1, 2]
  assert (
    loaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[user]hi"
  )
