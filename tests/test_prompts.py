"""Prompt texts as the released code writes them."""

import pytest

from cuma_jax.data import prompts


def test_question_mark_is_appended_as_the_released_code_does():
  assert prompts.user_prompt("Why?", ["Yes", "No"]) == (
    "Why?? A. Yes B. No. You can only choose one option."
  )
  with pytest.raises(ValueError):
    prompts.user_prompt("Q", [str(i) for i in range(27)])
