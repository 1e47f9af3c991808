"""Logical axis names and the default rules table mapping them to mesh axes.

Every parameter and sharded activation in cuma_jax is annotated with the logical
names below (``nn.with_logical_partitioning`` / ``nn.with_logical_constraint``);
a config's ``mesh.rules`` (a sequence of ``(logical, mesh_axis_or_None)``) decides
where each one lives.  Keeping the names in one place lets a fork add a mesh axis
without touching the layers.
"""

# Backbone.
BATCH = "batch"
LENGTH = "length"
EMBED = "embed"
VOCAB = "vocab"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP = "mlp"
LAYERS = "layers"
NORM = "norm"
# Adapters and routers.
EXPERTS = "experts"
LORA_RANK = "lora_rank"
ROUTER_HIDDEN = "router_hidden"
DEMO = "demo"
PREFIX = "prefix"

# Default: data parallel over "data", tensor parallel over "model"; adapters and
# routers are small and replicated apart from the axes they share with the backbone.
DEFAULT_RULES = (
    (BATCH, "data"),
    (LENGTH, None),
    (EMBED, None),
    (VOCAB, "model"),
    (HEADS, "model"),
    (KV_HEADS, "model"),
    (HEAD_DIM, None),
    (MLP, "model"),
    (LAYERS, None),
    (NORM, None),
    (EXPERTS, None),
    (LORA_RANK, None),
    (ROUTER_HIDDEN, None),
    (DEMO, None),
    (PREFIX, None),
)
