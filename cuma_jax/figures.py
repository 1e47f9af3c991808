"""Matplotlib figures of a run: training curves, metrics against the references, routing.

Each drawing function returns a :class:`matplotlib.figure.Figure` (shown inline by a
notebook, written by :func:`save`); none calls ``pyplot.show``. The mean-collapse study
(``experiments/mean_collapse``) and the notebooks in ``colab/`` draw with these.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import json
import os
from typing import cast

from matplotlib.colors import ListedColormap
import matplotlib.pyplot as plt
import numpy as np
from numpy.typing import ArrayLike

from cuma_jax.analysis import RoutingUsage


def read_metrics(path: str) -> list[dict]:
  """The records of a training run's ``metrics.jsonl`` (``WORKDIR/train/metrics.jsonl`` for
  a survey run, ``WORKDIR/<stage>/metrics.jsonl`` for a preference stage)."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def save(figure, directory: str, name: str) -> None:
  """Writes ``figure`` to ``directory/name`` (PNG, 120 dpi), creating the directory; an empty
  ``directory`` saves nothing (a notebook that only shows its figures)."""
  if directory:
    os.makedirs(directory, exist_ok=True)
    figure.savefig(os.path.join(directory, name), dpi=120)


def training_curves(
  runs: Mapping[str, Sequence[dict]], keys: Sequence[str] = ("loss", "balance_loss")
):
  """One panel per metric key, one line per run, against the training step."""
  fig, axes = plt.subplots(
    1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False, constrained_layout=True
  )
  for ax, key in zip(axes[0], keys, strict=True):
    for label, records in runs.items():
      points = [(r["step"], r[key]) for r in records if key in r]
      if points:
        ax.plot(*zip(*points, strict=True), label=label, lw=1.2)
    ax.set_xlabel("step")
    ax.set_title(key.replace("_", " "), fontsize=9)
    ax.legend(fontsize=7)
  return fig


def _palette(name: str) -> Sequence:
  """The colours of a listed (qualitative) colormap such as tab10."""
  colormap = plt.get_cmap(name)
  if not isinstance(colormap, ListedColormap):
    raise ValueError(f"{name} is not a listed colormap (tab10, tab20, ...)")
  return cast(Sequence, colormap.colors)  # Typed ArrayLike; a listed colormap's is a sequence.


def metric_bars(
  rows: Mapping[str, Mapping[str, float]],
  metrics: Sequence[tuple[str, str]] = (("accuracy", "accuracy ↑"), ("emd_mean", "mean EMD ↓")),
  title: str = "",
):
  """Bars of each row's metrics (``rows[label][metric key]``), one panel per metric."""
  labels = list(rows)
  colours = _palette("tab10")
  fig, axes = plt.subplots(
    1,
    len(metrics),
    figsize=(3.6 * len(metrics), 0.45 * len(labels) + 1.2),
    squeeze=False,
    constrained_layout=True,
  )
  for ax, (key, name) in zip(axes[0], metrics, strict=True):
    values = [rows[label][key] for label in labels]
    ax.barh(labels, values, color=[colours[i % len(colours)] for i in range(len(labels))])
    for y, value in enumerate(values):
      ax.text(value, y, f" {value:.3f}", va="center", fontsize=7)
    ax.set_title(name, fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(0, max(values) * 1.25 if max(values) > 0 else 1)
    ax.tick_params(labelsize=7)
  if title:
    fig.suptitle(title, fontsize=9)
  return fig


def cultural_topology(groups: Mapping[str, Mapping[str, np.ndarray]], title: str = ""):
  """Heatmaps of expert usage per group and layer, one panel per router, on one colour
  scale: ``groups`` is :func:`cuma_jax.analysis.usage_by_group`'s output. Each group is a
  block of rows, its layers from top to bottom."""
  names = sorted(groups)
  routers = sorted(groups[names[0]])
  layers = groups[names[0]][routers[0]].shape[0]
  rows = len(names) * layers
  fig, axes = plt.subplots(
    1,
    len(routers),
    figsize=(2.2 * len(routers) + 1.0, min(max(2.8, 0.06 * rows + 1.2), 16.0)),
    squeeze=False,
    constrained_layout=True,
  )
  top = max(float(groups[g][r].max()) for g in names for r in routers)
  for ax, router in zip(axes[0], routers, strict=True):
    matrix = np.concatenate([groups[g][router] for g in names])
    image = ax.imshow(matrix, cmap="viridis", aspect="auto", vmin=0.0, vmax=top)
    for boundary in range(1, len(names)):
      ax.axhline(boundary * layers - 0.5, color="white", lw=0.8)
    ax.set_title(router, fontsize=8)
    ax.set_xlabel("expert", fontsize=7)
    ax.set_xticks(range(matrix.shape[1]))
    ax.set_yticks([i * layers + (layers - 1) / 2 for i in range(len(names))])
    ax.set_yticklabels(names if ax is axes[0][0] else [], fontsize=6)
    ax.tick_params(labelsize=6)
  axes[0][0].set_ylabel(f"group (rows: layers 0-{layers - 1})", fontsize=7)
  fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="mean gate weight per token")
  if title:
    fig.suptitle(title, fontsize=9)
  return fig


def routing_projection(
  usage: RoutingUsage, label: Callable[[str], str] | Sequence[str], title: str = ""
):
  """Each profile's routing (every router's usage, flattened) on its two leading principal
  components, coloured by ``label`` (a function of the profile, or one label per profile)."""
  routers = sorted(usage.usage)
  flat = np.concatenate([usage.usage[r].reshape(len(usage.profiles), -1) for r in routers], 1)
  centred = flat - flat.mean(0)
  _, _, vt = np.linalg.svd(centred, full_matrices=False)
  xy = centred @ vt[:2].T
  if xy.shape[1] < 2:  # one profile, or routing that never varies
    xy = np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))
  labels = np.array([label(p) for p in usage.profiles] if callable(label) else list(label))
  fig, ax = plt.subplots(figsize=(4.2, 3.6), constrained_layout=True)
  for group in sorted(set(labels)):
    x, y = xy[labels == group].T
    ax.scatter(x, y, s=8, label=group)
  ax.set_xlabel("PC 1")
  ax.set_ylabel("PC 2")
  ax.legend(fontsize=7)
  if title:
    ax.set_title(title, fontsize=9)
  return fig


def emd_curves(curves: Mapping[str, ArrayLike], dashed: Sequence[str] = ()):
  """Per curve, the fraction of questions whose EMD is at most each threshold in [0, 0.6];
  the labels in ``dashed`` (reference predictors) are drawn dashed."""
  thresholds = np.linspace(0.0, 0.6, 61)
  fig, ax = plt.subplots(figsize=(5.2, 3.6), constrained_layout=True)
  colours = _palette("tab20")  # one colour per curve (the default cycle has 10)
  for i, (label, emds) in enumerate(curves.items()):
    colour = colours[i % len(colours)]
    emds = np.asarray(emds)
    fraction = [(emds <= t).mean() for t in thresholds]
    style = "--" if label in dashed else "-"
    ax.plot(thresholds, fraction, style, label=label, lw=1.2, color=colour)
  ax.set_xlabel("EMD threshold")
  ax.set_ylabel("fraction of questions")
  ax.legend(fontsize=6, ncol=2)
  return fig


def lines_with_errors(
  panels: Mapping[str, Mapping[str, Sequence[tuple[float, float, float]]]],
  xlabel: str,
  log_x: bool = False,
  dashed: Sequence[str] = (),
):
  """One panel per title of ``panels``, one line per label with error bars: each point is
  (x, mean, std); the labels in ``dashed`` (references) are drawn dashed."""
  fig, axes = plt.subplots(
    1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False, constrained_layout=True
  )
  for ax, (title, lines) in zip(axes[0], panels.items(), strict=True):
    for label, points in lines.items():
      x, mean, std = np.asarray(points, dtype=float).T
      style = "--" if label in dashed else "-"
      ax.errorbar(x, mean, yerr=std, fmt=style, label=label, marker="o", ms=3, lw=1.2, capsize=3)
    if log_x:
      ax.set_xscale("log", base=2)
      ticks = sorted({p[0] for points in lines.values() for p in points})
      ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.axhline(0.0, color="grey", lw=0.6, ls=":")
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
  return fig
