"""The released PyTorch CuMA module's checkpoint directory, both ways (docs/interop.md#release).

``adapter_config.json`` carries the release's keys; ``adapter_model.safetensors`` every
trainable tensor under its PyTorch name: per adapted projection P
(``model.layers.{i}.{self_attn|mlp}.{proj}``) ``P.lora_a`` [r, in] (one A shared by the
experts, ``use_hydra_lora``) or ``P.lora_a.{e}``, and ``P.lora_b.{e}`` [out, r]; router n's
MLP under the first adapted projection's name,
``<first P>._router_manager.routers.{n}.mlp.{j}.{weight,bias}`` with the Linear layers at
j = 1, 4, 7 (each preceded by a Dropout, ReLU between), the first reading concat(x, z).
Routers are numbered as a layer registers its projections; q/k/v share one when
``share_router_for_qkv`` and gate/up when ``share_router_for_w_i``.  A trainable demographic
projection is ``demographic_encoder.pt``, its state dict (``0.weight``, ``0.bias`` and, with
two layers, ``2.weight``, ``2.bias``: Linear, ReLU, Linear), read only as tensors.
"""

from __future__ import annotations

import json
import os

import numpy as np

from cuma_jax.checkpoints.adapter_formats import (
  CONFIG_FILE,
  FormatError,
  Part,
  Row,
  export_rows,
  hf_module,
  import_rows,
  lora_path,
  ordered_targets,
  read_config,
  router_name,
  router_path,
)
from cuma_jax.checkpoints.safetensors_io import TensorIndex, write_safetensors
from cuma_jax.layers.adapter_config import GROUPS, TARGET_MODULES, AdapterConfig

WEIGHTS = "adapter_model.safetensors"
DEMOGRAPHIC_FILE = "demographic_encoder.pt"
RELEASE_ROUTER = "token_and_demographics"
# Our gates the release computes: top-k routing (a softmax over the top-k probabilities) or
# soft routing (the raw top-k probabilities).
GATE_OF_TOP_K_ROUTING = {True: "softmax_top_probs", False: "top_probs"}
MAX_ROUTER_LAYERS = 3
MAX_PROJECTION_LAYERS = 2
DEMOGRAPHIC_PATH = "adapters_demographic"
# The release's shared-router keys: our group -> (adapter_config key, module key suffix).
SHARED_KEYS = {"attn_in": "share_router_for_qkv", "mlp_in": "share_router_for_w_i"}
SHARED_SUFFIX = {"attn_in": "self_attn.qkv_shared", "mlp_in": "mlp.w_i_shared"}


def check_exportable(adapter: AdapterConfig) -> None:
  """Refuses what the released module cannot represent, naming our config key."""

  def refuse(key, why):
    raise FormatError(f"--format=cuma_release: adapter.{key}={getattr(adapter, key)!r} {why}")

  if adapter.prefix_length:
    refuse("prefix_length", "(prefix tuning) has no place in the released CuMA module")
  if not adapter.targets:
    refuse("targets", "is empty: the released module adapts projections")
  if adapter.router != RELEASE_ROUTER:
    refuse("router", f"cannot be represented: the release's router is {RELEASE_ROUTER!r}")
  if adapter.gate not in GATE_OF_TOP_K_ROUTING.values():
    refuse(
      "gate",
      f"cannot be represented: the release computes {tuple(GATE_OF_TOP_K_ROUTING.values())} "
      "(top_k_routing_strategy true / false)",
    )
  hidden = adapter.router_hidden
  if len(hidden) + 1 > MAX_ROUTER_LAYERS or len(set(hidden)) > 1:
    refuse(
      "router_hidden",
      f"cannot be represented: the release's router has 1 to {MAX_ROUTER_LAYERS} layers of "
      "one hidden width (router_hidden_dim)",
    )
  if adapter.router_dropout != adapter.dropout:
    refuse("router_dropout", f"differs from adapter.dropout={adapter.dropout}: the release has one")
  projection = adapter.demographic_projection
  if len(projection) > MAX_PROJECTION_LAYERS or len(set(projection)) > 1:
    refuse(
      "demographic_projection",
      f"cannot be represented: the release's projection has 1 or {MAX_PROJECTION_LAYERS} "
      "layers of one width (demographic_embed_dim)",
    )


def _router_keys(adapter: AdapterConfig, num_layers: int) -> dict[tuple[int, str], int]:
  """{(layer, our router name): the release's router index}, in registration order."""
  index: dict[tuple[int, str], int] = {}
  for i in range(num_layers):
    for t in ordered_targets(adapter):
      index.setdefault((i, router_name(adapter, t)), len(index))
  return index


def _projection(i: int, target: str) -> str:
  return f"model.layers.{i}.{hf_module(target)}.{target}"


def rows(adapter: AdapterConfig, num_layers: int) -> list[Row]:
  targets = ordered_targets(adapter)
  out = []
  for i in range(num_layers):
    for t in targets:
      p = _projection(i, t)
      a = (i, lora_path(t, "a"))
      if adapter.shared_a:
        out.append(Row(f"{p}.lora_a", (Part(a),)))
      else:
        out += [Row(f"{p}.lora_a.{e}", (Part(a, e),)) for e in range(adapter.num_experts)]
      b = (i, lora_path(t, "b"))
      out += [Row(f"{p}.lora_b.{e}", (Part(b, e),)) for e in range(adapter.num_experts)]
  owner = f"{_projection(0, targets[0])}._router_manager.routers"
  for (i, name), n in _router_keys(adapter, num_layers).items():
    target = next(t for t in targets if router_name(adapter, t) == name)

    def leaf(name, target=target, i=i):
      return Part((i, router_path(adapter, target, name)))

    mlp = f"{owner}.{n}.mlp"
    out.append(Row(f"{mlp}.1.weight", (leaf("in_x"), leaf("in_z"))))
    out.append(Row(f"{mlp}.1.bias", (leaf("in_bias"),)))
    for j in range(1, len(adapter.router_hidden) + 1):
      out.append(Row(f"{mlp}.{1 + 3 * j}.weight", (leaf(f"layer{j}_w"),)))
      out.append(Row(f"{mlp}.{1 + 3 * j}.bias", (leaf(f"layer{j}_bias"),)))
  return out


def projection_rows(adapter: AdapterConfig) -> list[Row]:
  """The demographic projection's state dict (Linear, ReLU, Linear)."""
  out = []
  for j in range(len(adapter.demographic_projection)):
    dense = (None, (DEMOGRAPHIC_PATH, f"dense_{j}"))
    out.append(Row(f"{2 * j}.weight", (Part((None, (*dense[1], "kernel"))),)))
    out.append(Row(f"{2 * j}.bias", (Part((None, (*dense[1], "bias"))),)))
  return out


def export(
  flat,
  adapter: AdapterConfig,
  num_layers: int,
  directory: str,
  *,
  base_model: str,
  model_type: str,
  hidden_size: int,
  lambda_aux: float,
) -> None:
  """Writes ``flat`` (our per-layer adapter arrays) in the released layout."""
  check_exportable(adapter)
  tensors = export_rows(rows(adapter, num_layers), flat)
  os.makedirs(directory, exist_ok=True)
  write_safetensors(os.path.join(directory, WEIGHTS), tensors, metadata={"format": "pt"})
  projection = adapter.demographic_projection
  if projection:
    _write_state_dict(
      os.path.join(directory, DEMOGRAPHIC_FILE), export_rows(projection_rows(adapter), flat)
    )
  dtype = tensors[0][1].dtype
  targets = ordered_targets(adapter)
  config = {
    "lora_r": adapter.rank,
    "lora_alpha": adapter.alpha,
    "dropout": adapter.dropout,
    "num_experts": adapter.num_experts,
    "top_k": adapter.top_k,
    "use_hydra_lora": adapter.shared_a,
    "demographic_embed_dim": projection[-1] if projection else adapter.demographic_dim,
    "router_hidden_dim": adapter.router_hidden[0] if adapter.router_hidden else 0,
    "num_router_mlp_layers": len(adapter.router_hidden) + 1,
    "top_k_routing_strategy": adapter.gate == GATE_OF_TOP_K_ROUTING[True],
    "use_load_balancing_loss": lambda_aux > 0,
    "lambda_auxiliary": lambda_aux,
    "target_modules": targets,
    "target_modules_lora": targets,
    "share_router_for_qkv": adapter.share_router,
    "share_router_for_w_i": adapter.share_router,
    "num_encoder_proj_mlp_layers": len(projection),
    "torch_dtype": f"torch.{'bfloat16' if dtype.name == 'bfloat16' else dtype.name}",
    "hidden_size": hidden_size,
    "base_model": base_model,
    "model_type": model_type,
    "peft_type": "CuMA",
  }
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=2)


def _torch():
  try:
    import torch
  except ImportError:
    raise FormatError(
      f"{DEMOGRAPHIC_FILE} (the demographic projection) is a PyTorch file: install torch"
    ) from None
  return torch


def _write_state_dict(path: str, tensors) -> None:
  torch = _torch()
  torch.save({name: torch.from_numpy(np.array(t)) for name, t in tensors}, path)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A state dict of tensors; anything else (arbitrary pickled objects) is refused."""
  torch = _torch()
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch's unpickler names the forbidden global
    raise FormatError(f"{path} is not a plain state dict of tensors, refused: {e}") from None
  if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
    raise FormatError(f"{path} is not a state dict of tensors")
  return {
    k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()
  }


def _key(directory, config, key, kinds):
  if key not in config:
    raise FormatError(f"{directory}: {CONFIG_FILE} lacks the release's key {key!r}")
  value = config[key]
  if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
    raise FormatError(f"{directory}: {key}={value!r} in {CONFIG_FILE} is not a {kinds}")
  return value


def settings(directory: str) -> dict:
  """Our adapter keys for a released directory, after refusing what we do not model."""
  config = read_config(directory)

  def get(key, *kinds):
    return _key(directory, config, key, kinds)

  if config.get("peft_type") != "CuMA":
    raise FormatError(f"{directory}: peft_type={config.get('peft_type')!r}, not 'CuMA'")
  targets = get("target_modules", list)
  if not targets or any(t not in TARGET_MODULES for t in targets):
    raise FormatError(f"{directory}: target_modules={targets!r}; supported: {TARGET_MODULES}")
  lora_only = get("target_modules_lora", list, type(None)) or []
  if any(t not in targets for t in lora_only):
    raise FormatError(
      f"{directory}: target_modules_lora={lora_only!r} names projections outside "
      f"target_modules={targets!r}, which cuma_jax does not model"
    )
  layers = get("num_router_mlp_layers", int)
  if not 1 <= layers <= MAX_ROUTER_LAYERS:
    raise FormatError(
      f"{directory}: num_router_mlp_layers={layers}; supported: 1 to {MAX_ROUTER_LAYERS}"
    )
  adapted = {g: [t for t in members if t in targets] for g, members in GROUPS.items()}
  flags = {get(SHARED_KEYS[g], bool) for g in SHARED_KEYS if len(adapted[g]) > 0}
  if len(flags) > 1:
    raise FormatError(
      f"{directory}: share_router_for_qkv={config['share_router_for_qkv']} and "
      f"share_router_for_w_i={config['share_router_for_w_i']} differ; cuma_jax shares routers "
      "in both groups or in neither (adapter.share_router)"
    )
  projection_layers = get("num_encoder_proj_mlp_layers", int)
  if not 0 <= projection_layers <= MAX_PROJECTION_LAYERS:
    raise FormatError(
      f"{directory}: num_encoder_proj_mlp_layers={projection_layers}; supported: 0 to "
      f"{MAX_PROJECTION_LAYERS}"
    )
  d_demo = get("demographic_embed_dim", int)
  encoder_dim = d_demo
  if projection_layers:
    state = read_state_dict(os.path.join(directory, DEMOGRAPHIC_FILE))
    if "0.weight" not in state:
      raise FormatError(f"{directory}/{DEMOGRAPHIC_FILE} lacks the first layer's '0.weight'")
    encoder_dim = int(state["0.weight"].shape[1])
  hidden = get("router_hidden_dim", int)
  return {
    "targets": tuple(t for t in TARGET_MODULES if t in targets),
    "rank": get("lora_r", int),
    "alpha": float(get("lora_alpha", int, float)),
    "num_experts": get("num_experts", int),
    "top_k": get("top_k", int),
    "shared_a": get("use_hydra_lora", bool),
    "router": RELEASE_ROUTER,
    "router_hidden": (hidden,) * (layers - 1),
    "demographic_dim": encoder_dim,
    "demographic_projection": (d_demo,) * projection_layers,
    "share_router": flags.pop() if flags else False,
    "gate": GATE_OF_TOP_K_ROUTING[get("top_k_routing_strategy", bool)],
    "prefix_length": 0,
  }


def load(directory: str, adapter: AdapterConfig, shapes: dict, dtype) -> dict:
  """Our per-layer adapter arrays from a released directory, every tensor checked."""
  index = TensorIndex(directory, filename=WEIGHTS)
  layers = 1 + max(layer for layer, _ in shapes if layer is not None)
  layer_shapes = {k: s for k, s in shapes.items() if k[0] is not None}
  out = import_rows(
    rows(adapter, layers),
    index.read,
    {n: index.shape(n) for n in index.names()},
    layer_shapes,
    f"{directory}/{WEIGHTS}",
    dtype,
  )
  projection_shapes = {k: s for k, s in shapes.items() if k[0] is None}
  if projection_shapes:
    path = os.path.join(directory, DEMOGRAPHIC_FILE)
    state = read_state_dict(path)
    out.update(
      import_rows(
        projection_rows(adapter),
        state.__getitem__,
        {k: v.shape for k, v in state.items()},
        projection_shapes,
        path,
        dtype,
      )
    )
  return out
