#!/usr/bin/env bash
# FlashAttention 4 (the flash-attn-4 package) for `bench.train_step --attention fa4`, packed for a
# GPU box without network, on a machine with one:
#
#   bash bench/fa4-wheels.sh          # writes bench/wheels-fa4/ (ignored by git)
#
# For the box's Python 3.12 and CUDA 13 torch. Its CuTe DSL compiler is a 92 MB wheel; beside the
# other wheels that is more than a device call carries (64 MiB). xz with a dictionary as large as
# its biggest library packs that wheel's contents into 53 MB, 64 MB in all, so FlashAttention 4
# travels in a call of its own that installs it and stops, and the benchmark follows at once on the
# same warm machine (docs/benchmarks.md, "Running it on a GPU box"):
#
#   BENCH_INSTALL_ONLY=1 bash bench/gpu.sh        carrying bench/wheels-fa4
#   BENCH_ONLY="... sd15-bs16-bf16-fa4-attn" bash bench/gpu.sh   carrying bench/wheels
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=bench/wheels-fa4
BOX=(--no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$DIR"
# cuda-bindings, which the compiler also needs, comes with the box's torch (2.11 for CUDA 13 requires it).
pip download -q -d "$DIR" "${BOX[@]}" flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 \
    nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 protobuf==7.36.2 \
    apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5 quack-kernels==0.6.5 einops==0.8.2
pip download -q -d "$tmp" "${BOX[@]}" nvidia-cutlass-dsl-libs-cu13==4.8.1
mkdir "$tmp/contents"
python -m zipfile -e "$tmp"/nvidia_cutlass_dsl_libs_cu13-*.whl "$tmp/contents"
# One thread: xz's threads split the input into blocks and lose the matches across them.
tar -C "$tmp/contents" -cf - . | xz -T1 --lzma2=preset=9e,dict=256MiB >"$DIR/nvidia_cutlass_dsl_libs_cu13-4.8.1.tar.xz"
du -ch "$DIR"/* | tail -1
