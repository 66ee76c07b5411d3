#!/usr/bin/env bash
# Wheels for gpu_check.py's `peers` stage, downloaded here (the GPU machine reaches no registry) into
# .whl/, which .gitignore lists. They are eai-sparsify, the peer bench_gpu.py
# compares with, and what `import sparsify` needs that the GPU machine's image lacks:
# all pure Python, for that machine's Python 3.12. Then pass
# carry [".whl"] to the device tool's run (docs/benchmarks.md); gpu_check installs them into a
# temporary folder. Without them the benchmark records sparsify as not importable and goes on.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl eai-sparsify==1.3.3 simple-parsing docstring-parser natsort schedulefree datasets dill multiprocess
ls .whl
du -sh .whl
