"""The package's metadata: one version (``cuma_jax.__version__``, which setup.cfg reads) and
the license setup.cfg declares."""

import configparser
import importlib.metadata
import os

from packaging.version import Version

import cuma_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_cfg():
  parser = configparser.ConfigParser()
  parser.read(os.path.join(ROOT, "setup.cfg"))
  return parser["metadata"]


def test_version_is_the_installed_distributions():
  # The oracle: the version setuptools recorded when pip installed the package from setup.cfg.
  assert importlib.metadata.version("cuma_jax") == cuma_jax.__version__
  assert str(Version(cuma_jax.__version__)) == cuma_jax.__version__
  assert _setup_cfg()["version"] == "attr: cuma_jax.__version__"  # one source of truth


def test_license_file_is_the_license_setup_cfg_declares():
  assert _setup_cfg()["license"] == "Apache-2.0"
  with open(os.path.join(ROOT, "LICENSE")) as f:
    text = f.read()
  assert "Apache License" in text and "Version 2.0, January 2004" in text
  assert "END OF TERMS AND CONDITIONS" in text
