"""Who routes where: per-token routing decisions gathered per profile and per group.

:func:`routing_usage` runs a restored :class:`~cuma_jax.tasks.survey.Experiment` over a split with
the decoder's ``capture_routing`` output and averages, for every profile, each router's
gate mass per expert and layer over the profile's real (non-padding) tokens.
:func:`usage_by_group` then averages profiles by any label — the synthetic survey's latent
culture (:func:`latent_culture`), a country or an age group (:func:`profile_field`) — which
is the paper's "cultural topology".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from cuma_jax.data.pipeline import as_text
from cuma_jax.data.prompts import PROFILE_FIELDS
from cuma_jax.training.step import demographics_for


@dataclasses.dataclass
class RoutingUsage:
  """Per-profile routing: ``usage[router]`` is [profiles, layers, experts], each profile's
  mean gate weight per expert over its tokens (rows sum to the mean total gate mass)."""

  profiles: tuple[str, ...]
  tokens: np.ndarray  # [profiles] real tokens seen per profile
  usage: dict[str, np.ndarray]


def _usage_step(module):
  """(params, batch, z) -> {router: [B, L, N] gate mass per expert summed over tokens}."""
  capture = module.clone(capture_routing=True)

  def step(params, batch, z):
    _, aux = capture.apply(
      {"params": params},
      batch["input_ids"],
      attention_mask=batch["attention_mask"],
      demographics=z,
      logit_indices=batch["prompt_length"][:, None],
    )
    mask = batch["attention_mask"].astype(jnp.float32)
    num_experts = next(iter(aux["expert_counts"].values())).shape[-1]
    out = {}
    for router, decision in aux["routing"].items():
      # [L, B, T, k] experts and gates -> [B, L, N] mass per expert over real tokens.
      one_hot = jax.nn.one_hot(decision["experts"], num_experts, dtype=jnp.float32)
      mass = jnp.einsum("lbtk,lbtkn,bt->bln", decision["gates"], one_hot, mask)
      out[router] = mass
    return out

  return jax.jit(step)


def routing_usage(experiment, split: str, max_examples: int | None = None) -> RoutingUsage:
  """Routing of ``experiment``'s model on ``split``, aggregated per profile.

  Raises if the model has no routers (LoRA, prefix tuning, full fine-tuning).
  """
  adapter = experiment.module.adapter
  if adapter is None or not adapter.targets or adapter.router == "none":
    raise ValueError(f"the {experiment.config.method} model has no router to analyse")
  dataset, tables = experiment.dataset(split)
  table = None
  if experiment.demographics is not None:
    table = jnp.asarray(experiment.demographics.encode(tables.profiles))
  step = _usage_step(experiment.module)
  profiles = len(tables.profiles)
  tokens = np.zeros(profiles)
  usage: dict[str, np.ndarray] = {}
  seen = 0
  for batch in dataset:
    batch = {k: np.asarray(v) for k, v in batch.items()}
    mass = step(experiment.params, batch, demographics_for(table, batch))
    index = batch["profile_index"]
    np.add.at(tokens, index, batch["attention_mask"].sum(-1))
    for router, value in mass.items():
      if router not in usage:
        usage[router] = np.zeros((profiles, *value.shape[1:]))
      np.add.at(usage[router], index, np.asarray(value))
    seen += len(index)
    if max_examples is not None and seen >= max_examples:
      break
  present = tokens > 0
  return RoutingUsage(
    profiles=tuple(p for p, keep in zip(tables.profiles, present, strict=True) if keep),
    tokens=tokens[present],
    usage={r: u[present] / tokens[present, None, None] for r, u in usage.items()},
  )


def usage_by_group(
  usage: RoutingUsage, label: Callable[[str], str] | Sequence[str]
) -> dict[str, dict[str, np.ndarray]]:
  """{group: {router: [layers, experts]}}: token-weighted mean usage of each group's
  profiles.  ``label`` maps a profile string to its group (or lists one per profile)."""
  labels = [label(p) for p in usage.profiles] if callable(label) else list(label)
  if len(labels) != len(usage.profiles):
    raise ValueError(f"{len(labels)} labels for {len(usage.profiles)} profiles")
  groups = {}
  for group in sorted(set(labels)):
    rows = np.array([lab == group for lab in labels])
    weights = usage.tokens[rows] / usage.tokens[rows].sum()
    groups[group] = {r: np.einsum("p,pln->ln", weights, u[rows]) for r, u in usage.usage.items()}
  return groups


def profile_field(source, field: str) -> Callable[[str], str]:
  """A survey profile's value of demographic ``field`` (``country``, ``age_group``, ...;
  :data:`cuma_jax.data.prompts.PROFILE_FIELDS`), as the records of ``source`` give it: the
  labels by which real survey data (which has no latent culture) groups its profiles."""
  if field not in PROFILE_FIELDS:
    raise ValueError(f"field {field!r}; allowed: {PROFILE_FIELDS}")
  values = {}
  for index in range(len(source)):
    record = source[index]
    values[as_text(record["profile"])] = as_text(record["demographics"][field])
  return values.__getitem__


def latent_culture(oracle) -> Callable[[str], str]:
  """The synthetic survey's most probable latent culture of a profile, as a label."""
  return lambda profile: f"culture {int(np.argmax(oracle.culture_posterior[profile]))}"
