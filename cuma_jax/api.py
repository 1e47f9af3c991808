"""The library API a script or notebook lives on (the top of the package).

Every name here is also ``cuma_jax.<name>`` (listed in ``cuma_jax.__all__``).

Build a config, run the experiment it describes, get a trained workdir back as objects and
look at its routing, without the command line::

    import cuma_jax

    config = cuma_jax.experiment_config("cuma", "demo")
    cuma_jax.run(config, "runs/demo")                   # or a preference config
    experiment = cuma_jax.restore("runs/demo")          # model, params, tokenizer, data
    usage = cuma_jax.routing_usage(experiment, "test")   # per-profile expert usage
    cuma_jax.export_adapters("runs/demo", "out/demo", "cuma_release")  # for PyTorch
    by_culture = cuma_jax.usage_by_group(usage, cuma_jax.latent_culture(experiment.data.oracle))
"""

from __future__ import annotations

# Re-exports (``name as name``): this module's namespace is the API.
from cuma_jax.analysis import latent_culture as latent_culture
from cuma_jax.analysis import profile_field as profile_field
from cuma_jax.analysis import routing_usage as routing_usage
from cuma_jax.analysis import usage_by_group as usage_by_group
from cuma_jax.interop import export_adapters as export_adapters
from cuma_jax.models.pretrained import build_decoder as build_decoder
from cuma_jax.models.pretrained import load_pretrained as load_pretrained
from cuma_jax.models.pretrained import load_tokenizer as load_tokenizer
from cuma_jax.models.pretrained import save_pretrained as save_pretrained
from cuma_jax.presets import experiment_config as experiment_config
from cuma_jax.runtime import Experiment as Experiment
from cuma_jax.tasks import prepare as prepare
from cuma_jax.tasks import restore as restore
from cuma_jax.tasks import run as run
