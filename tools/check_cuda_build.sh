#!/usr/bin/env bash
# Compile-checks the CUDA backend's ATen bindings (csrc/torch/cuda_ops.cu and
# the kernels it links) by building ssae_kernels._C with SSAE_BUILD_CUDA=1
# against a CUDA build of torch, in a venv outside the repo. No GPU is needed.
# The result is built outside the repo: the repo's own _C is untouched.
#
#   tools/check_cuda_build.sh            # venv: $SSAE_CUDA_VENV or /tmp/cuda-venv (created on first use)
#
# Environment: SSAE_CUDA_VENV, SSAE_CUDA_BUILD_DIR (default /tmp/ssae-cuda-build),
# SSAE_CUDA_TORCH (default torch==2.14.1, a CUDA 13
# build), CUDA_HOME (default /usr/local/cuda, matching nvcc 13.0),
# TORCH_CUDA_ARCH_LIST (default 8.0;9.0+PTX from setup.py), MAX_JOBS (default 2).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${SSAE_CUDA_VENV:-/tmp/cuda-venv}"
TORCH_REQ="${SSAE_CUDA_TORCH:-torch==2.14.1}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export MAX_JOBS="${MAX_JOBS:-2}"
export SSAE_BUILD_CUDA=1

if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null; then
  echo "== creating $VENV with $TORCH_REQ (a CUDA build; several GB, about a minute)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "$TORCH_REQ" setuptools wheel ninja pybind11 numpy
fi
"$VENV/bin/python" -c "import torch; print('== torch', torch.__version__, 'CUDA', torch.version.cuda)"
nvcc --version | tail -1

# A persistent build directory: the sources are copied with their timestamps,
# so ninja recompiles only what changed since the last check.
WORK="${SSAE_CUDA_BUILD_DIR:-/tmp/ssae-cuda-build}"
mkdir -p "$WORK/ssae_kernels"
rm -rf "$WORK/csrc"
cp -a "$ROOT/setup.py" "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/csrc" "$WORK/"
rm -f "$WORK"/lib/ssae_kernels/_C*.so
cd "$WORK"
echo "== building ssae_kernels._C with the CUDA backend in $WORK"
status=0
"$VENV/bin/python" setup.py -q build_ext --build-temp "$WORK/tmp" --build-lib "$WORK/lib" > "$WORK/build.log" 2>&1 || status=$?
# compiler output without ninja's command lines and setuptools' deprecation banners
grep -v -E "^\[[0-9]+/[0-9]+\] |SetuptoolsDeprecationWarning|^!!|^\s*\*+$|project.license|By 20[0-9]{2}|See https://packaging|corresp\(dist|^\s*$|Please use a simple string|update your project|builds will no longer" \
  "$WORK/build.log" || true
if [ "$status" -ne 0 ]; then
  echo "== BUILD FAILED ($status)"
  exit "$status"
fi
SO="$(ls "$WORK"/lib/ssae_kernels/_C*.so)"

# The module loads (CUDA torch, no GPU) and registers a CUDA kernel for every op
# it has a CPU kernel for. The schemas are declared by the package, which is not
# imported here (its _C is the CPU build), so the registrations show as dangling.
"$VENV/bin/python" - "$SO" <<'PY'
import importlib.util
import re
import sys

import torch

spec = importlib.util.spec_from_file_location("ssae_kernels._C", sys.argv[1])
C = importlib.util.module_from_spec(spec)
spec.loader.exec_module(C)
info = C.build_info()
keys = {}
for entry in torch._C._dispatch_find_dangling_impls():
    name = re.search(r"name: ssae::(\w+)", entry).group(1)
    keys[name] = set(re.findall(r"^(\w+): registered at", entry, re.M))
missing = sorted(name for name, k in keys.items() if "CPU" in k and "CUDA" not in k)
assert info["cuda"] is True and keys and not missing, (info, missing)
print("== OK:", sys.argv[1].rsplit("/", 1)[-1], "loads; build_info()['cuda'] =", info["cuda"],
      f"; CPU and CUDA kernels registered for all {len(keys)} ops")
PY
