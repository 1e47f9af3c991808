"""The CuMA layer: routing and gates, expert dispatch, router and expert modules, groups.

Importing any module of this package registers the bundled research variants
(:mod:`cuma_jax.layers.variants`), so configs can select them by name.
"""

from cuma_jax.layers import variants  # noqa: F401  (registers the variants)
