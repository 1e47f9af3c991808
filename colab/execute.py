"""Runs a notebook top to bottom with parameters, and fails on the first cell that raises.

    python colab/execute.py colab/quickstart.ipynb -p PRESET='"tiny"' -p WORKDIR='"/tmp/q"' \
        [--output executed.ipynb] [--cwd DIR] [--timeout SECONDS]

Each ``-p NAME=EXPRESSION`` is Python source. Like papermill, the values go into a new cell
placed after the notebook's cell tagged ``parameters``, so the notebook runs with them; a
name that cell does not assign is refused (it would be silently ignored). The kernel is this
interpreter's own (``python3`` from ipykernel). CI runs every notebook this way with tiny
settings (``tests/test_notebooks.py``); the figures and tables of ``colab/results.md`` come
from runs of this command with the notebooks' defaults.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys

import nbclient
import nbformat

PARAMETERS_TAG = "parameters"
INJECTED_TAG = "injected-parameters"


def parameters_cell(notebook) -> int:
  """The index of the notebook's one cell tagged ``parameters``."""
  found = [
    i for i, cell in enumerate(notebook.cells) if PARAMETERS_TAG in cell.metadata.get("tags", [])
  ]
  if len(found) != 1:
    raise ValueError(f"a notebook needs exactly one cell tagged {PARAMETERS_TAG!r}; found {found}")
  return found[0]


def parameter_names(notebook) -> tuple[str, ...]:
  """The names the parameters cell assigns, in order."""
  source = notebook.cells[parameters_cell(notebook)].source
  names = []
  for node in ast.parse(source).body:
    targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
    names += [t.id for t in targets if isinstance(t, ast.Name)]
  return tuple(names)


def with_parameters(notebook, parameters: dict[str, str]):
  """A copy of ``notebook`` whose parameters are set to ``parameters`` (name -> Python
  source), in a cell after the parameters cell."""
  unknown = sorted(set(parameters) - set(parameter_names(notebook)))
  if unknown:
    raise ValueError(
      f"parameters {unknown} are not in the notebook's parameters cell; it has "
      f"{parameter_names(notebook)}"
    )
  for _name, source in parameters.items():
    ast.parse(source, mode="eval")  # a malformed value fails here, before a kernel starts
  copy = nbformat.from_dict(notebook)
  if parameters:
    cell = nbformat.v4.new_code_cell(
      "# Parameters set by colab/execute.py\n"
      + "".join(f"{name} = {source}\n" for name, source in parameters.items())
    )
    cell.metadata["tags"] = [INJECTED_TAG]
    copy.cells.insert(parameters_cell(notebook) + 1, cell)
  return copy


def execute(
  path: str,
  parameters: dict[str, str] | None = None,
  *,
  cwd: str | None = None,
  timeout: int = 1800,
  env: dict[str, str] | None = None,
  output: str | None = None,
):
  """Executes the notebook at ``path`` in ``cwd`` (default: the notebook's folder) with this
  interpreter's kernel; returns the executed notebook, also written to ``output`` if given.

  Raises :class:`nbclient.exceptions.CellExecutionError` (naming the cell and its traceback)
  at the first cell that raises.
  """
  notebook = with_parameters(nbformat.read(path, as_version=4), parameters or {})
  env = dict(os.environ if env is None else env)
  # The kernel is this interpreter's: its folder first on PATH, whatever the caller's PATH.
  env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
  client = nbclient.NotebookClient(
    notebook,
    timeout=timeout,
    kernel_name="python3",
    resources={"metadata": {"path": cwd or os.path.dirname(os.path.abspath(path))}},
  )
  try:
    client.execute(env=env)
  finally:
    if output:
      nbformat.write(notebook, output)
  return notebook


def _parameter(text: str) -> tuple[str, str]:
  name, sep, source = text.partition("=")
  if not sep or not name.isidentifier():
    raise argparse.ArgumentTypeError(f"-p {text!r}: write NAME=PYTHON_EXPRESSION")
  return name, source


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("notebook")
  parser.add_argument("-p", "--parameter", type=_parameter, action="append", default=[])
  parser.add_argument("--output", help="where the executed notebook is written")
  parser.add_argument("--cwd", help="the kernel's working directory (default: the notebook's)")
  parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
  args = parser.parse_args(argv)
  execute(
    args.notebook, dict(args.parameter), cwd=args.cwd, timeout=args.timeout, output=args.output
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
