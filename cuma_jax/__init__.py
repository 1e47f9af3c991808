"""cuma_jax: CuMA (Cultural Mixture of Adapters) in JAX/Flax."""
