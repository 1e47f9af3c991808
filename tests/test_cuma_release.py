"""The released CuMA layout, against a PyTorch CuMA written here from the method's facts.

:class:`ReleasedCuMA` wraps a Hugging Face model's projections the way the released module
is described (one router manager registered on every adapted projection, so that PyTorch
names each router once, under the first projection; Dropout/Linear/ReLU router MLPs on
concat(x, z); gates a softmax over the top-k probabilities, or the raw probabilities; the
balance loss per router, summed).  It shares no code with cuma_jax: its parameter names come
from ``named_parameters`` and its numbers from torch.
"""

import dataclasses
import json
import os
import shutil

from helpers import padded_batch, randomise
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from cuma_jax.checkpoints import adapter_formats, adapter_import, cuma_release
from cuma_jax.layers.adapter_config import TARGET_MODULES, AdapterConfig
from cuma_jax.params import filter_tree, is_adapter_path, merge_trees

D_ENCODER = 6
RNG = jax.random.PRNGKey(2)  # one key: every test of a case reuses the loaded model
ATTENTION = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")


class RouterManager(nn.Module):
  """Every router of the model; each forward computes a router once and records its loss."""

  def __init__(self, widths_of, num_experts, hidden, layers, dropout):
    super().__init__()
    self.routers = nn.ModuleList()
    self.num_experts, self.hidden, self.layers, self.dropout = num_experts, hidden, layers, dropout
    self.widths_of = widths_of

  def add(self, d_in, d_demo):
    mlp = []
    widths = [d_in + d_demo] + [self.hidden] * (self.layers - 1) + [self.num_experts]
    for j in range(self.layers):
      mlp += [nn.Dropout(self.dropout), nn.Linear(widths[j], widths[j + 1])]
      if j < self.layers - 1:
        mlp.append(nn.ReLU())
    router = nn.Module()
    router.mlp = nn.Sequential(*mlp)
    self.routers.append(router)
    return len(self.routers) - 1


class CuMALinear(nn.Module):
  def __init__(self, base, manager, router, cfg):
    super().__init__()
    self.base, self.cfg, self.router = base, cfg, router
    r, n = cfg["lora_r"], cfg["num_experts"]
    a = lambda: nn.Parameter(torch.randn(r, base.in_features) * 0.01)  # noqa: E731
    if cfg["use_hydra_lora"]:
      self.lora_a = a()
    else:
      self.lora_a = nn.ParameterList([a() for _ in range(n)])
    self.lora_b = nn.ParameterList(
      [nn.Parameter(torch.zeros(base.out_features, r)) for _ in range(n)]
    )
    self._router_manager = manager

  def forward(self, x):
    cfg, manager = self.cfg, self._router_manager
    state = manager.state
    if self.router not in state["gates"]:  # a shared router runs once per forward
      z = state["z"][:, None, :].expand(*x.shape[:-1], -1)
      logits = manager.routers[self.router].mlp(torch.cat([x, z], -1).float())
      probs = torch.softmax(logits, -1)
      top_p, top_i = torch.topk(probs, cfg["top_k"], -1)
      gates = torch.softmax(top_p, -1) if cfg["top_k_routing_strategy"] else top_p
      state["gates"][self.router] = (gates, top_i)
      state["losses"].append(balance_loss(probs, gates, top_i, state["mask"], cfg))
    gates, top_i = state["gates"][self.router]
    scale = cfg["lora_alpha"] / cfg["lora_r"]
    out = self.base(x)
    for slot in range(cfg["top_k"]):
      for e in range(cfg["num_experts"]):
        a = self.lora_a if cfg["use_hydra_lora"] else self.lora_a[e]
        weight = gates[..., slot] * (top_i[..., slot] == e)
        out = out + scale * weight[..., None] * (x @ a.T @ self.lora_b[e].T)
    return out


def balance_loss(probs, gates, top_i, mask, cfg):
  n, k = cfg["num_experts"], cfg["top_k"]
  m = mask.float()[..., None]
  tokens = m.sum()
  if not cfg["top_k_routing_strategy"]:
    weights, freq = probs, torch.full((n,), 1.0 / k)
  else:
    weights = torch.zeros_like(probs).scatter(-1, top_i, gates)
    freq = (m * (weights > 0)).sum((0, 1)) / (tokens * k)
  prop = (m * weights).sum((0, 1)) / tokens
  return n * (prop * freq).sum()


class ReleasedCuMA(nn.Module):
  """A Hugging Face causal LM with CuMA on the configured projections."""

  def __init__(self, model, cfg, encoder_dim):
    super().__init__()
    self.model_ref = [model]
    self.cfg = cfg
    d_demo = cfg["demographic_embed_dim"]
    layers = cfg["num_encoder_proj_mlp_layers"]
    self.projection = None
    if layers:
      mods = [nn.Linear(encoder_dim, d_demo)] + [nn.ReLU(), nn.Linear(d_demo, d_demo)] * (
        layers - 1
      )
      self.projection = nn.Sequential(*mods)
    manager = RouterManager(
      None, cfg["num_experts"], cfg["router_hidden_dim"], cfg["num_router_mlp_layers"], 0.0
    )
    keys = {}
    adapted = [
      (name, module)
      for name, module in model.named_modules()
      if name.rsplit(".", 1)[-1] in cfg["target_modules"]
    ]
    for name, module in adapted:
      layer, proj = name.rsplit(".", 1)
      parent_name = layer.rsplit(".", 1)[0]
      key = name
      if cfg["share_router_for_qkv"] and proj in ATTENTION:
        key = f"{parent_name}.self_attn.qkv_shared"
      if cfg["share_router_for_w_i"] and proj in GATE_UP:
        key = f"{parent_name}.mlp.w_i_shared"
      if key not in keys:
        keys[key] = manager.add(module.in_features, d_demo)
      parent = model.get_submodule(layer)
      setattr(parent, proj, CuMALinear(module, manager, keys[key], cfg))
    self.manager = manager
    for p in model.parameters():
      p.requires_grad_(False)
    for name, p in model.named_parameters(remove_duplicate=False):
      if "lora_" in name or "_router_manager" in name:
        p.requires_grad_(True)

  def adapter_state_dict(self):
    """What the release saves: every trainable parameter, named once."""
    return {n: p.detach() for n, p in self.model_ref[0].named_parameters() if p.requires_grad}

  def forward(self, ids, mask, z):
    z = torch.tensor(z)
    if self.projection is not None:
      z = self.projection(z)
    self.manager.state = {"z": z, "mask": torch.tensor(mask), "gates": {}, "losses": []}
    with torch.no_grad():
      logits = self.model_ref[0](
        input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)
      ).logits
    return logits.numpy(), float(sum(self.manager.state["losses"]))


@dataclasses.dataclass(frozen=True)
class Case:
  model: str
  shared_a: bool
  share_router: bool
  router_hidden: tuple
  gate: str
  projection: tuple
  targets: tuple = TARGET_MODULES


CASES = {
  "hydra-shared-2layer-topk": Case("qwen3", True, True, (16,), "softmax_top_probs", ()),
  "perexpert-own-1layer-soft-proj1": Case("llama3", False, False, (), "top_probs", (5,)),
  "hydra-own-3layer-topk-proj2": Case(
    "qwen3", True, False, (16, 16), "softmax_top_probs", (5, 5), ("q_proj", "v_proj", "down_proj")
  ),
}
# The fast tier checks the released layout (shared A, one router); the others are slow.
CASE_PARAMS = [
  name if name == "hydra-shared-2layer-topk" else pytest.param(name, marks=pytest.mark.slow)
  for name in CASES
]


def adapter_of(case: Case, **extra):
  return AdapterConfig(
    targets=case.targets,
    rank=4,
    alpha=8.0,
    num_experts=4,
    top_k=2,
    shared_a=case.shared_a,
    router_hidden=case.router_hidden,
    demographic_dim=D_ENCODER,
    demographic_projection=case.projection,
    share_router=case.share_router,
    gate=case.gate,
    strategy="dense",
    **extra,
  )


def _inputs(vocab):
  ids, mask = padded_batch(vocab, [9, 6], 9, seed=4)
  z = np.random.default_rng(7).normal(size=(2, D_ENCODER)).astype(np.float32)
  return ids, mask, z


def _ours(module, params, ids, mask, z):
  apply = jax.jit(
    lambda p, i, m, d: module.apply({"params": p}, i, attention_mask=m, demographics=d)
  )
  logits, aux = apply(params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(z))
  return np.asarray(logits), float(aux["balance_loss"])


def _trained_like(module_params, seed):
  """Adapters moved off their initialisation (B is zero there)."""
  adapters = filter_tree(module_params, is_adapter_path)
  adapters = randomise(adapters, seed, scale=0.3)
  return merge_trees(filter_tree(module_params, lambda p: not is_adapter_path(p)), adapters)


def _export(params, adapter, out):
  flat = adapter_formats.unstack(filter_tree(params, is_adapter_path))
  cuma_release.export(
    flat,
    adapter,
    adapter_formats.num_layers(flat),
    str(out),
    base_model="tiny",
    model_type="qwen3",
    hidden_size=32,
    lambda_aux=0.01,
  )
  return json.loads((out / "adapter_config.json").read_text())


def _reference(tiny_checkpoint, name, cfg):
  directory, torch_model = tiny_checkpoint(name)
  torch.manual_seed(11)
  return ReleasedCuMA(type(torch_model).from_pretrained(directory), cfg, D_ENCODER)


def _load_into(reference, directory):
  state = safetensors.torch.load_file(os.path.join(directory, cuma_release.WEIGHTS))
  expected = reference.adapter_state_dict()
  assert set(state) == set(expected), (sorted(set(state) ^ set(expected)))[:6]
  with torch.no_grad():
    for name, tensor in state.items():
      expected[name].copy_(tensor)
    if reference.projection is not None:
      projection = torch.load(
        os.path.join(directory, cuma_release.DEMOGRAPHIC_FILE), weights_only=True
      )
      reference.projection.load_state_dict(projection)


def _diff(a, b, mask):
  return float(np.max(np.abs(a - b)[np.asarray(mask, bool)]))


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_export_loads_into_the_pytorch_release_with_equal_logits_and_loss(
  tiny_checkpoint, pretrained, tmp_path, case
):
  case = CASES[case]
  adapter = adapter_of(case)
  module, params = pretrained(case.model, adapter=adapter, rng=RNG)
  params = _trained_like(params, seed=3)
  cfg = _export(params, adapter, tmp_path)
  reference = _reference(tiny_checkpoint, case.model, cfg)
  _load_into(reference, tmp_path)
  ids, mask, z = _inputs(module.config.vocab_size)
  theirs, their_loss = reference(ids, mask, z)
  ours, our_loss = _ours(module, params, ids, mask, z)
  base = tiny_checkpoint(case.model)[1](input_ids=torch.tensor(ids)).logits.detach().numpy()
  assert _diff(theirs, base, mask) > 1e-2
  assert _diff(ours, theirs, mask) < 1e-4
  assert abs(our_loss - their_loss) < 1e-5
  # Round trip: importing the export gives our parameters back, bit for bit.
  imported = adapter_import.read(
    dataclasses.replace(adapter, init_from=str(tmp_path)),
    filter_tree(params, is_adapter_path),
    False,
  )
  want = jax.tree_util.tree_leaves_with_path(filter_tree(params, is_adapter_path))
  got = dict(jax.tree_util.tree_leaves_with_path(imported))
  for path, value in want:
    assert np.array_equal(np.asarray(value), got[path]), path


def _torch_made(tiny_checkpoint, case, out):
  """A released directory written from the PyTorch module (its own init, B perturbed)."""
  cfg = {
    "lora_r": 4,
    "lora_alpha": 8,
    "dropout": 0.0,
    "num_experts": 4,
    "top_k": 2,
    "use_hydra_lora": case.shared_a,
    "demographic_embed_dim": case.projection[-1] if case.projection else D_ENCODER,
    "router_hidden_dim": case.router_hidden[0] if case.router_hidden else 256,
    "num_router_mlp_layers": len(case.router_hidden) + 1,
    "top_k_routing_strategy": case.gate == "softmax_top_probs",
    "use_load_balancing_loss": True,
    "lambda_auxiliary": 0.01,
    "target_modules": list(case.targets),
    "target_modules_lora": list(case.targets),
    "share_router_for_qkv": case.share_router,
    "share_router_for_w_i": case.share_router,
    "num_encoder_proj_mlp_layers": len(case.projection),
    "torch_dtype": "torch.float32",
    "hidden_size": 32,
    "base_model": "tiny",
    "model_type": case.model,
    "peft_type": "CuMA",
  }
  reference = _reference(tiny_checkpoint, case.model, cfg)
  with torch.no_grad():
    for name, p in reference.adapter_state_dict().items():
      if "lora_b" in name:
        p.normal_(0, 0.3)
  os.makedirs(out, exist_ok=True)
  state = {k: v.contiguous() for k, v in reference.adapter_state_dict().items()}
  safetensors.torch.save_file(state, os.path.join(out, cuma_release.WEIGHTS))
  if reference.projection is not None:
    torch.save(reference.projection.state_dict(), os.path.join(out, cuma_release.DEMOGRAPHIC_FILE))
  with open(os.path.join(out, "adapter_config.json"), "w") as f:
    json.dump(cfg, f)
  return reference


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_a_state_dict_made_in_torch_imports_with_equal_logits(
  tiny_checkpoint, pretrained, tmp_path, case
):
  case = CASES[case]
  reference = _torch_made(tiny_checkpoint, case, tmp_path / "release")
  adapter = adapter_of(case, init_from=str(tmp_path / "release"))
  assert adapter_import.check_config(adapter) == "cuma_release"
  module, params = pretrained(case.model, adapter=adapter_of(case), rng=RNG)
  params = adapter_import.initialise(params, adapter, False)
  ids, mask, z = _inputs(module.config.vocab_size)
  theirs, their_loss = reference(ids, mask, z)
  ours, our_loss = _ours(module, params, ids, mask, z)
  assert _diff(ours, theirs, mask) < 1e-4
  assert abs(our_loss - their_loss) < 1e-5
  # And back out: the same tensors, bit for bit.
  _export(params, adapter_of(case), tmp_path / "again")
  original = safetensors.torch.load_file(tmp_path / "release" / cuma_release.WEIGHTS)
  again = safetensors.torch.load_file(tmp_path / "again" / cuma_release.WEIGHTS)
  assert original.keys() == again.keys()
  for key, value in original.items():
    assert torch.equal(value, again[key]), key
  if case.projection:
    for file in ("release", "again"):
      assert (tmp_path / file / cuma_release.DEMOGRAPHIC_FILE).is_file()
    before = torch.load(tmp_path / "release" / cuma_release.DEMOGRAPHIC_FILE, weights_only=True)
    after = torch.load(tmp_path / "again" / cuma_release.DEMOGRAPHIC_FILE, weights_only=True)
    assert all(torch.equal(before[k], after[k]) for k in before) and before.keys() == after.keys()


@pytest.mark.parametrize(
  "key, value",
  [
    ("gate", "softmax_top_logits"),
    ("router", "token"),
    ("router_hidden", (16, 8)),
    ("router_hidden", (16, 16, 16)),
    ("demographic_projection", (8, 4)),
    ("prefix_length", 4),
    ("router_dropout", 0.1),
  ],
)
def test_what_the_release_cannot_represent_is_refused_naming_the_key(key, value):
  adapter = dataclasses.replace(adapter_of(CASES["hydra-shared-2layer-topk"]), **{key: value})
  with pytest.raises(adapter_formats.FormatError, match=f"adapter.{key}="):
    cuma_release.check_exportable(adapter)


@pytest.fixture(scope="module")
def release_dir(tiny_checkpoint, tmp_path_factory):
  out = tmp_path_factory.mktemp("release")
  _torch_made(tiny_checkpoint, CASES["perexpert-own-1layer-soft-proj1"], out)
  return out


def _edited(release_dir, tmp_path, config=None, tensors=None, projection=None):
  out = shutil.copytree(release_dir, tmp_path / "edited")
  if config:
    cfg = json.loads((out / "adapter_config.json").read_text())
    config(cfg)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
  if tensors:
    state = safetensors.torch.load_file(out / cuma_release.WEIGHTS)
    tensors(state)
    safetensors.torch.save_file(state, out / cuma_release.WEIGHTS)
  if projection:
    projection(out / cuma_release.DEMOGRAPHIC_FILE)
  return str(out)


ROUTER0 = "model.layers.0.self_attn.q_proj._router_manager.routers.0.mlp.1.weight"


class NotATensor:
  pass


@pytest.mark.parametrize(
  "edits, named",
  [
    (dict(tensors=lambda s: s.pop(ROUTER0)), r"missing.*routers\.0\.mlp\.1\.weight"),
    (
      dict(tensors=lambda s: s.update({"model.layers.0.mlp.up_proj.lora_b.4": torch.zeros(48, 4)})),
      r"extra.*up_proj\.lora_b\.4",
    ),
    (
      dict(
        tensors=lambda s: s.update({"model.layers.1.self_attn.v_proj.lora_a.3": torch.zeros(4, 8)})
      ),
      r"v_proj\.lora_a\.3.*shape \(4, 8\), expected \(4, 32\)",
    ),
    (dict(config=lambda c: c.update(num_router_mlp_layers=4)), "num_router_mlp_layers=4"),
    (dict(config=lambda c: c.update(share_router_for_w_i=True)), "share_router_for_w_i"),
    (dict(config=lambda c: c.update(target_modules=["q_proj", "lm_head"])), "target_modules"),
    (dict(config=lambda c: c.pop("lora_r")), "lora_r"),
    (
      dict(projection=lambda path: torch.save({"0.weight": NotATensor()}, path)),
      r"demographic_encoder\.pt is not a plain state dict of tensors",
    ),
  ],
  ids=[
    "missing",
    "extra",
    "shape",
    "router_layers",
    "mixed_sharing",
    "target",
    "no_rank",
    "pickle",
  ],
)
def test_a_bad_release_directory_is_refused_naming_what(
  pretrained, release_dir, tmp_path, edits, named
):
  directory = _edited(release_dir, tmp_path, **edits)
  case = CASES["perexpert-own-1layer-soft-proj1"]
  adapter = adapter_of(case, init_from=directory)
  _, params = pretrained(case.model, adapter=adapter_of(case), rng=RNG)
  with pytest.raises(adapter_formats.FormatError, match=named):
    adapter_import.initialise(params, adapter, False)
