#!/usr/bin/env bash
# The offline wheel kit for the one-GPU machine (`make gpu-kit`): what bertscale needs there that
# its image lacks, as wheels for its interpreter (CPython 3.12, manylinux x86_64), pinned by
# constraints.txt, into benchmarks/wheels/ (git-ignored). That machine has no network; its image
# (benchmarks/README.md) has torch, transformers, tokenizers, numpy, pytest, mpi4py and most of
# DeepSpeed's dependencies, but not DeepSpeed nor these:
#   deepspeed        built here from its sdist: py3-none-any (no op is prebuilt; the GPU path
#                    passes its own optimizers and needs none of DeepSpeed's JIT-built ones)
#   hjson            DeepSpeed's config reader (pure Python)
#   pydantic         DeepSpeed's config models, with pydantic-core (a cp312 manylinux wheel),
#                    annotated-types and typing-inspection (pure Python)
# The trainer never imports webdataset (only bertscale.data.wds, the pipeline for other loops,
# does), and the GPU check runs with W&B off.
#
#   bash benchmarks/gpu_kit.sh [OUT]      # OUT defaults to benchmarks/wheels
#   GPU_KIT_PYTHON=3.12 GPU_KIT_ABI=cp312  # the target interpreter (the device's), by default
#
# Needs only python3 with pip and the package index (DeepSpeed's sdist builds in pip's own
# isolated environment, with DS_BUILD_OPS=0). Fails, naming it, when a wheel is not for the target
# or the kit outgrows GPU_KIT_MAX_MIB (default 10). Replaces OUT's wheels only once all are built.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
abspath() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
OUT="$(abspath "${1:-$ROOT/benchmarks/wheels}")"
PY="${PYTHON:-python3}"
TARGET="${GPU_KIT_PYTHON:-3.12}"
ABI="${GPU_KIT_ABI:-cp${TARGET/./}}"
MAX_MIB="${GPU_KIT_MAX_MIB:-10}"
PACKAGES=(deepspeed hjson pydantic pydantic-core annotated-types typing-inspection)

pin() {  # the version constraints.txt pins for $1 (names compared as pip normalises them)
  local want; want="$(echo "$1" | tr 'A-Z_.' 'a-z--')"
  while IFS= read -r line; do
    line="${line%%#*}"; local name="${line%%==*}"
    [ "$line" != "$name" ] || continue
    if [ "$(echo "$name" | tr 'A-Z_.' 'a-z--' | tr -d ' ')" = "$want" ]; then
      echo "${line#*==}" | tr -d ' '; return 0
    fi
  done < "$ROOT/constraints.txt"
  echo "gpu_kit: constraints.txt pins no version of $1" >&2; return 1
}

BUILD="$(mktemp -d "${TMPDIR:-/tmp}/gpu_kit.XXXXXX")"
trap 'rm -rf "$BUILD"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1
echo "gpu_kit: wheels for CPython $TARGET ($ABI, manylinux x86_64) into $OUT"
for pkg in "${PACKAGES[@]}"; do
  version="$(pin "$pkg")"
  if [ "$pkg" = deepspeed ]; then
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-cache-dir --no-deps --no-binary deepspeed \
      "deepspeed==$version" -w "$BUILD"
  else
    "$PY" -m pip download -q --no-deps --only-binary :all: --python-version "$TARGET" \
      --implementation cp --abi "$ABI" --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
      "$pkg==$version" -d "$BUILD"
  fi
done

total=0
for whl in "$BUILD"/*.whl; do
  name="$(basename "$whl")"
  tags="${name%.whl}"; tags="${tags#*-*-}"          # python-abi-platform
  case "$tags" in
    py3-none-any|py2.py3-none-any|"$ABI-$ABI-"*manylinux*x86_64*) ;;
    *) echo "gpu_kit: $name is not for CPython $TARGET on manylinux x86_64" >&2; exit 1 ;;
  esac
  size="$(stat -c %s "$whl")"; total=$((total + size))
  awk -v n="$name" -v s="$size" 'BEGIN { printf "  %-66s %6.2f MiB\n", n, s / 1048576 }'
done
if [ "$total" -gt $((MAX_MIB * 1048576)) ]; then
  echo "gpu_kit: the kit is $((total / 1048576)) MiB, over GPU_KIT_MAX_MIB=$MAX_MIB" >&2; exit 1
fi
mkdir -p "$OUT"
rm -f "$OUT"/*.whl
mv "$BUILD"/*.whl "$OUT"/
awk -v n="$(ls "$OUT"/*.whl | wc -l)" -v s="$total" -v o="$OUT" \
  'BEGIN { printf "gpu_kit: %d wheels, %.2f MiB in %s\n", n, s / 1048576, o }'
