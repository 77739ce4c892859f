#!/usr/bin/env bash
# make gpu-check: what the GPU path does, in one short run (under 8 minutes on an H100).
#
# On a machine with a CUDA GPU: a virtual environment that sees the machine's own torch
# (--system-site-packages: never the CPU wheel the Makefile pins), the project installed into it
# without touching that torch, then
#   1. benchmarks/distill_throughput.py --lm in bf16 (SmolLM2-135M, 2 layers and ~15% of the FFN
#      pruned, on Hamlet): fine-tuning, live-teacher KD and cached top-k KD, torch.compile off
#      and on, in tokens/s, TFLOP/s and the share of the GPU's dense bf16 peak;
#   2. the bitsandbytes CUDA tests (8/4-bit stage on the GPU, CUDA memory on the card) and the
#      8-bit teacher;
#   3. one distill stage end to end (cached top-k KD of a tiny Llama, bf16 autocast).
# Without a GPU it says so and exits 0: nothing here can be checked on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
VENV=${GPU_VENV:-.venv-gpu}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false DO_NOT_TRACK=1

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu-check: no CUDA GPU on this machine (nvidia-smi finds none); nothing to check here."
    echo "gpu-check: run 'make gpu-check' on a machine with an NVIDIA GPU and its CUDA torch."
    exit 0
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu-check: a GPU is present but $PY has no CUDA torch; install the machine's torch"
    echo "gpu-check: build first (this check uses it, it never installs torch itself)."
    exit 0
fi
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# --- the project over the machine's torch -----------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv --system-site-packages "$VENV"
fi
BIN="$VENV/bin"
"$BIN/python" -m pip install -q --no-deps -e . >/dev/null
# Everything but torch, pinned as the Makefile pins it; skipped when already importable (a GPU
# machine without an index must have them preinstalled).
grep -v -E '^torch==' constraints.txt > "$VENV/constraints-no-torch.txt"
if ! "$BIN/python" -c "import transformers, optimum.onnxruntime, torch_pruning, bitsandbytes, \
accelerate, datasets, pytest" 2>/dev/null; then
    "$BIN/python" -m pip install -q -c "$VENV/constraints-no-torch.txt" \
        transformers optimum 'optimum-onnx[onnxruntime]' onnx onnxruntime onnxscript \
        torch-pruning bitsandbytes accelerate datasets gguf pydantic pyyaml typer rich tqdm \
        psutil safetensors pytest
fi
"$BIN/python" -m compress.assets assets --lm >/dev/null
"$BIN/python" - <<'EOF'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}, "
      f"bf16 {torch.cuda.is_bf16_supported()}")
EOF

# Dense bf16 peak of the card, for the "of peak" column (TFLOP/s, no sparsity).
name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case "$name" in
    *H200*|*H100*SXM*|*"H100 80GB HBM3"*) peak=989 ;;
    *H100*PCIe*|*"H100 PCIe"*) peak=756 ;;
    *H100*) peak=989 ;;
    *A100*) peak=312 ;;
    *L40S*) peak=362 ;;
    *L4*) peak=121 ;;
    *A10*) peak=125 ;;
    *) peak=0 ;;
esac
peak_arg=()
[ "$peak" != 0 ] && peak_arg=(--peak-tflops "$peak")

echo; echo "== 1. LM distillation throughput, bf16, live vs cached teacher, compile off/on =="
"$BIN/python" benchmarks/distill_throughput.py --lm --steps 30 --batch-size 16 \
    --compile both "${peak_arg[@]}"

echo; echo "== 2. bitsandbytes on CUDA (8/4-bit stage, CUDA memory on the card, 8-bit teacher) =="
"$BIN/python" -m pytest -q -p no:cacheprovider tests/integration/test_bnb.py \
    tests/integration/test_llm_task.py -k "bnb or int8"

echo; echo "== 3. one distill stage on the GPU (cached top-k KD, bf16 autocast) =="
"$BIN/python" -m pytest -q -p no:cacheprovider tests/integration/test_causal_lm.py \
    -k "cached_topk or half_precision"

echo; echo "gpu-check: done in $(( $(date +%s) - start )) s on $name (bf16 peak ${peak} TFLOP/s)"
