#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md ("GPU") in one run of under 10 minutes on one H100 / H200:
#   1. ViT-B/16 train step, bf16 compute with f32 params and AdamW state, batch 256: images/s and
#      MFU against the bf16 peak table (vlm_jax.flops), with cuDNN's flash attention (attention
#      "auto" on a GPU; the JSON's attention_impl says whether cuDNN ran), with XLA's, and with
#      XLA's Triton GEMM fusions off (cuBLAS for every matmul);
#   2. ViT-Ti/16 at batch 256 against Hugging Face PyTorch on the same GPU (f32 and bf16 autocast).
# Usage: bash tools/gpu_benchmark.sh [OUT_DIR]     (JSON lines and the log land in OUT_DIR)
#
# A host without the trainer's lighter requirements (ml-collections, e.g. the device machines of
# this workplace, which reach no package index) installs them from wheels in ./.whl first:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl ml-collections
# TensorFlow is not needed: the train-step benchmarks import no tf.data.
# GPU_BENCH_SMOKE=1 runs the same commands at toy sizes (to check the script on a CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/vlm_jax_gpu_bench}}
mkdir -p "$out"
py=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/vlm_jax_site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/vlm_jax_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1

if [[ "${GPU_BENCH_SMOKE:-0}" == 1 ]]; then
  b16=(--width 32 --depth 2 --heads 2 --image-size 32 --patch 8 --batch 8 --rounds 1 --steps 1)
  ti=(--width 32 --depth 2 --heads 2 --image-size 32 --patch 8 --batch 8 --rounds 1 --steps 1)
else
  b16=(--width 768 --depth 12 --heads 12 --image-size 224 --patch 16 --batch 256 --rounds 3 --steps 10)
  ti=(--width 192 --depth 12 --heads 3 --image-size 224 --patch 16 --batch 256 --rounds 3 --steps 10)
fi

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$py" -c "import jax; print('jax', jax.__version__, jax.devices())"
  "$py" tools/benchmark.py --json "$out/vit_b16_bf16.json" train-vit "${b16[@]}" --dtype bfloat16 --scan --no-hf
  "$py" tools/benchmark.py --json "$out/vit_b16_bf16_xla_attention.json" train-vit "${b16[@]}" --dtype bfloat16 \
    --scan --no-hf --attention xla
  if [[ "${GPU_BENCH_SMOKE:-0}" != 1 ]]; then  # cuBLAS for every GEMM instead of XLA's Triton fusions
    XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" "$py" tools/benchmark.py \
      --json "$out/vit_b16_bf16_no_triton_gemm.json" train-vit "${b16[@]}" --dtype bfloat16 --scan --no-hf
  fi
  "$py" tools/benchmark.py --json "$out/vit_ti16_bf16_vs_torch.json" train-vit "${ti[@]}" --dtype bfloat16 --scan
} 2>&1 | tee "$out/log.txt"
