#!/usr/bin/env bash
# Builds .whl/ (at the repository's root) from wheels.txt for a lent GPU machine: Python 3.12 on
# x86-64 Linux, no package registry there. Run here, where pip reaches one:
#   experiments/device/wheels.sh [PIP]      (PIP defaults to python3 -m pip)
# Refuses a folder over the 64 MiB the working tree may carry in all.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
pip=(${1:-python3 -m pip})
out="$root/.whl"
limit_mib=48  # of the 64 MiB the whole working tree may carry
rm -rf "$out"
mkdir -p "$out"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
  manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
grep -v '^#' "$root/experiments/device/wheels.txt" | while read -r pin; do
  [ -n "$pin" ] || continue
  if ! "${pip[@]}" download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d "$out" "$pin" 2>/dev/null; then
    # Published as a source archive only: build its (pure Python) wheel here.
    "${pip[@]}" wheel -q --no-deps -w "$out" "$pin"
  fi
done
count=$(ls "$out"/*.whl | wc -l)
expected=$(grep -cv -e '^#' -e '^$' "$root/experiments/device/wheels.txt")
if [ "$count" -ne "$expected" ]; then
  echo "wheels.sh: $count wheels in .whl/ for $expected pins in wheels.txt" >&2
  exit 1
fi
size_kib=$(du -sk "$out" | cut -f1)
if [ "$size_kib" -gt $((limit_mib * 1024)) ]; then
  echo "wheels.sh: .whl/ holds $((size_kib / 1024)) MiB, over the ${limit_mib} MiB allowed" >&2
  exit 1
fi
echo "wheels.sh: $count wheels, $((size_kib / 1024)) MiB in $out"
