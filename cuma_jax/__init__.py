"""cuma_jax: CuMA (Cultural Mixture of Adapters) in JAX/Flax."""

from cuma_jax.api import load_pretrained, load_tokenizer, save_pretrained

__all__ = ["load_pretrained", "load_tokenizer", "save_pretrained"]
