"""Exports a run's adapters: ``python -m cuma_jax.export --workdir=W --format=peft --out=DIR``.

Formats (docs/interop.md): ``peft`` (a PEFT LoRA adapter of a plain-LoRA run, e.g. the
``W/baselines/lora`` baseline), ``cuma_release`` (the released PyTorch CuMA layout) and
``native`` (cuma_jax's own); each export carries a README.md model card.
"""

import sys

from absl import app, flags

from cuma_jax import interop

_WORKDIR = flags.DEFINE_string("workdir", None, "The trained run's workdir.", required=True)
_FORMAT = flags.DEFINE_enum("format", "native", interop.FORMATS, "The layout to write.")
_OUT = flags.DEFINE_string("out", None, "The directory to write.", required=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    out = interop.export_adapters(_WORKDIR.value, _OUT.value, _FORMAT.value)
  except (ValueError, FileNotFoundError) as e:  # a refusal: its one line, no traceback
    sys.exit(f"cuma_jax.export: {e}")
  print(f"wrote {_FORMAT.value} adapters to {out}")


if __name__ == "__main__":
  app.run(main)
