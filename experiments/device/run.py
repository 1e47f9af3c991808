"""One prepared run for a lent GPU: the device tests, then the measurements, each on its own.

    python3 experiments/device/run.py OUT [--wheels .whl] [--cpu-smoke] [--parts a,b]
        [--archive DIR]

On the device machine (experiments/device/README.md gives the whole command): installs the
carried wheels (``--wheels``, built here by ``experiments/device/wheels.sh``) offline and
the project without dependencies into a folder of its own, then runs the parts of
``parts.py`` in order, each in a fresh process under its own time budget, so that one
crash, hang or out-of-memory loses only that part:

  environment     JAX, torch and the card; its bf16 peak and a measured bf16 matmul rate
  tests           ``pytest -m device`` on this backend (HF parity, oracles, one sharded step)
  step            LoRA / CuMA dense / CuMA ragged training steps: tokens/s and MFU
  dispatch_sweep  ragged against dense dispatch at 8, 16, 32 and 64 experts
  memory          the plan's per-device memory against the measured peak
  decode          greedy decode tokens/s against Hugging Face ``generate``

Each part writes ``OUT/<part>.json`` and ``OUT/<part>.md`` (also when it fails: the error
and its time); ``OUT/summary.md`` and ``OUT/summary.json`` gather them. ``--archive DIR``
also writes ``summary.md`` and ``results.tar.gz`` (all of OUT) into DIR, as few files as
the device tool brings back. ``--cpu-smoke`` runs every part at tiny shapes on the CPU
(the tests only collected) in about half a minute: CI runs it (tests/test_device_run.py).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pathlib
import signal
import subprocess
import sys
import tarfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
# Seconds each part may take on one H100 (7.75 minutes in all, the most each part is
# expected to need), and with --cpu-smoke.
BUDGETS = {
  "environment": (45, 120),
  "tests": (120, 120),
  "step": (135, 120),
  "dispatch_sweep": (45, 120),
  "memory": (60, 120),
  "decode": (60, 120),
}
PARTS = tuple(BUDGETS)
# Parts where torch shares the GPU with JAX: JAX then takes memory as it needs it instead of
# 75% of the card up front.
PART_ENV = {name: {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"} for name in ("tests", "decode")}


def install(wheels: str, site: str) -> list[dict]:
  """Installs every wheel in ``wheels``, then the project, into ``site`` (no dependencies, no
  index); returns each command with its outcome. A failure is recorded, not raised: the
  parts then run with what there is (the project from this checkout) and say what broke."""
  found = sorted(glob.glob(os.path.join(wheels, "*.whl")))
  if not found:
    raise SystemExit(f"--wheels {wheels}: no .whl files there (experiments/device/wheels.sh)")
  pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
  pip += ["--no-cache-dir", "--upgrade", "--target", site]
  outcomes = []
  for command in ([*pip, *found], [*pip, "--no-build-isolation", ROOT]):
    done = subprocess.run(command, capture_output=True, text=True)
    outcome = "ok" if done.returncode == 0 else done.stderr.strip().splitlines()[-1:]
    outcomes.append({"command": " ".join(command), "outcome": outcome})
  return outcomes


def run_part(name: str, out: str, smoke: bool, env: dict, isolate: bool) -> dict:
  """Runs one part under its budget, in a fresh process of its own (``isolate``) or in this
  one; returns its status record."""
  budget = BUDGETS[name][1 if smoke else 0]
  start = time.perf_counter()
  log_path = os.path.join(out, f"{name}.log")
  if isolate:
    status = _run_isolated(name, out, smoke, env, budget, log_path)
  else:
    status = _run_here(name, out, smoke, budget)
  seconds = time.perf_counter() - start
  if status != "ok" and not os.path.exists(os.path.join(out, f"{name}.json")):
    tail = _tail(log_path) if os.path.exists(log_path) else []
    _write(out, name, {"error": status, "log_tail": tail}, f"**{status}**\n")
  return {"part": name, "status": status, "seconds": round(seconds, 1), "budget_s": budget}


def _run_isolated(name, out, smoke, env, budget, log_path) -> str:
  command = [sys.executable, os.path.abspath(__file__), out, "--part", name]
  if smoke:
    command.append("--cpu-smoke")
  with open(log_path, "w") as log:
    # A session of its own, so that a timeout ends its children (pytest) too.
    process = subprocess.Popen(
      command,
      env={**env, **PART_ENV.get(name, {})},
      stdout=log,
      stderr=subprocess.STDOUT,
      start_new_session=True,
    )
    try:
      code = process.wait(timeout=budget)
    except subprocess.TimeoutExpired:
      os.killpg(process.pid, signal.SIGKILL)
      process.wait()
      return f"timed out after {budget} s"
  return "ok" if code == 0 else f"failed (exit {code})"


def _run_here(name, out, smoke, budget) -> str:
  def expire(*_):
    raise TimeoutError(f"timed out after {budget} s")

  previous = signal.signal(signal.SIGALRM, expire)
  signal.alarm(budget)
  try:
    code = part_main(name, out, smoke)
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
  return "ok" if code == 0 else "failed"


def _tail(path: str, lines: int = 30) -> list[str]:
  with open(path, errors="replace") as f:
    return f.read().splitlines()[-lines:]


def _write(out: str, name: str, result: dict, table: str) -> None:
  with open(os.path.join(out, f"{name}.json"), "w") as f:
    json.dump(result, f, indent=2, default=str)
  with open(os.path.join(out, f"{name}.md"), "w") as f:
    f.write(f"## {name}\n\n{table}")


def part_main(name: str, out: str, smoke: bool) -> int:
  """In the part's own process: measure, write, and on an error still write what failed."""
  os.environ["DEVICE_RUN_OUT"] = out
  start = time.perf_counter()
  try:
    sys.path.insert(0, HERE)
    if ROOT not in sys.path:  # the project, where it is not installed
      sys.path.append(ROOT)
    import parts

    result, table = parts.PARTS[name](smoke)
  except Exception as error:  # the part's files must say what went wrong
    trace = traceback.format_exc()
    _write(out, name, {"error": repr(error), "traceback": trace}, f"**failed**: `{error!r}`\n")
    print(trace, file=sys.stderr)
    return 1
  result["seconds"] = round(time.perf_counter() - start, 1)
  _write(out, name, result, table)
  return 0


def summarize(out: str, statuses: list[dict], setup: dict) -> str:
  lines = ["# Device run", "", f"{setup['when']}, `{setup['command']}`", ""]
  lines += ["| part | status | s | budget s |", "|---|---|---|---|"]
  lines += [f"| {s['part']} | {s['status']} | {s['seconds']} | {s['budget_s']} |" for s in statuses]
  lines.append("")
  for s in statuses:
    path = os.path.join(out, f"{s['part']}.md")
    if os.path.exists(path):
      lines += [pathlib.Path(path).read_text(), ""]
  text = "\n".join(lines)
  with open(os.path.join(out, "summary.md"), "w") as f:
    f.write(text)
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump({**setup, "parts": statuses}, f, indent=2)
  return text


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("out", help="folder for the results (created)")
  parser.add_argument("--wheels", help="folder of wheels to install first (offline)")
  parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU")
  parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset, in order")
  parser.add_argument("--archive", help="also write summary.md and results.tar.gz here")
  parser.add_argument(
    "--isolate",
    action=argparse.BooleanOptionalAction,
    default=None,
    help="each part in a process of its own (default: yes, but not with --cpu-smoke)",
  )
  parser.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one part in-process
  args = parser.parse_args(argv)
  selected = [p for p in args.parts.split(",") if p]
  unknown = [p for p in selected if p not in BUDGETS]
  if unknown:
    parser.error(f"--parts: unknown {unknown}; allowed: {', '.join(PARTS)}")
  if args.part:
    return part_main(args.part, args.out, args.cpu_smoke)
  if os.path.exists(args.out) and os.listdir(args.out):
    parser.error(f"{args.out} exists and is not empty: name a new folder")
  os.makedirs(args.out, exist_ok=True)
  out = os.path.abspath(args.out)
  env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
  if args.cpu_smoke:
    if ROOT not in sys.path:  # the smoke runs from the checkout
      sys.path.append(ROOT)
    from cuma_jax import platforms  # JAX-free

    # Tiny programs: XLA:CPU's costly optimisation passes would dominate (as in the tests).
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=platforms.FAST_CPU_COMPILE_FLAGS)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
  # Compilations shared between parts (the memory part compiles the step's program again).
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(out, ".jax-cache"))
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  setup = {
    "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    "command": " ".join([os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])]),
  }
  if args.wheels:
    site = os.path.join(out, ".site")
    setup["install"] = install(args.wheels, site)
    # The project from this checkout too, should its install have failed.
    env["PYTHONPATH"] = os.pathsep.join([site, ROOT, env.get("PYTHONPATH", "")])
    for step in setup["install"]:
      print(f"install: {step['outcome']}: {step['command'][:200]}", flush=True)
  isolate = not args.cpu_smoke if args.isolate is None else args.isolate
  if not isolate:
    os.environ.update(env)
  statuses = []
  for name in selected:
    statuses.append(run_part(name, out, args.cpu_smoke, env, isolate))
    print(f"{name}: {statuses[-1]['status']} in {statuses[-1]['seconds']} s", flush=True)
  print(summarize(out, statuses, setup))
  if args.archive:
    os.makedirs(args.archive, exist_ok=True)
    with open(os.path.join(args.archive, "summary.md"), "w") as f:
      f.write(pathlib.Path(out, "summary.md").read_text())
    with tarfile.open(os.path.join(args.archive, "results.tar.gz"), "w:gz") as tar:
      for path in sorted(os.listdir(out)):
        if not path.startswith("."):
          tar.add(os.path.join(out, path), arcname=path)
  return 0 if all(s["status"] == "ok" for s in statuses) else 1


if __name__ == "__main__":
  sys.exit(main())
