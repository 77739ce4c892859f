#!/usr/bin/env bash
# make gpu-check: what the GPU path does, in one short run (under 8 minutes on an H100).
#
# On a machine with a CUDA GPU, over the machine's own torch (never the CPU wheel the Makefile
# pins): the project's other packages, pinned as constraints.txt pins them, go into a side folder
# put first on PYTHONPATH (a venv with --system-site-packages would not see torch when the
# machine's python3 is itself a venv), then (the short
# pass/fail steps first, so that a run cut short still says whether they pass)
#   1. the bitsandbytes CUDA tests (8/4-bit stage on the GPU, CUDA memory on the card) and the
#      8-bit teacher;
#   2. one distill stage end to end (cached top-k KD of a tiny Llama, bf16 autocast);
#   3. benchmarks/distill_throughput.py --lm in bf16 (SmolLM2-135M, 2 layers and ~15% of the FFN
#      pruned, on Hamlet): fine-tuning, live-teacher KD and cached top-k KD, torch.compile off
#      and on, in tokens/s, TFLOP/s and the share of the GPU's dense bf16 peak.
# Without a GPU it says so and exits 0: nothing here can be checked on a CPU.
#
# Offline GPU machines (no package index): GPU_WHEELS=<folder of wheels> installs from there
# (benchmarks/gpu_wheels.sh fills one), and GPU_ASSETS=<folder> supplies assets/ when
# the model packages are not installed; without SmolLM2's weights there, its architecture is
# built from its config.json with seeded random weights and the check says so (throughput does
# not depend on the weights' values).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
SITE=${GPU_SITE:-.gpu-site}
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

# --- the project's packages over the machine's torch ------------------------------------------
# Pinned by version where a different one changes behaviour (the machine may carry a newer
# transformers); the rest only when missing. Always --no-deps: a resolver would pull a torch.
source benchmarks/gpu_packages.sh
mkdir -p "$SITE"
export PYTHONPATH="$PWD/$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${GPU_WHEELS:-}" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$GPU_WHEELS"/*.whl
else
    want=()
    for dist in $GPU_PINNED; do
        v=$(pin "$dist")
        [ -n "$v" ] && want+=("$v")
    done
    for dist in $GPU_IF_MISSING; do
        if ! "$PY" -c "import importlib.metadata as m; m.version('$dist')" 2>/dev/null; then
            v=$(pin "$dist")
            [ -n "$v" ] && want+=("$v")
        fi
    done
    "$PY" -m pip install -q --no-deps --upgrade --target "$SITE" "${want[@]}"
fi
"$PY" - <<'PYEOF'
import torch, transformers, bitsandbytes, torch_pruning, pydantic
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}, "
      f"bf16 {torch.cuda.is_bf16_supported()}; transformers {transformers.__version__}, "
      f"bitsandbytes {bitsandbytes.__version__}, torch-pruning {torch_pruning.__version__}, "
      f"pydantic {pydantic.__version__}")
PYEOF

# --- assets: the model packages when installed, else GPU_ASSETS ---------------------------------
if [ -n "${GPU_ASSETS:-}" ]; then
    mkdir -p assets
    cp -r --update=none "$GPU_ASSETS"/. assets/
fi
if [ ! -f assets/smollm2/model.safetensors ] && [ -f assets/smollm2/config.json ]; then
    "$PY" - <<'PYEOF'
import torch
from transformers import AutoConfig, AutoModelForCausalLM
torch.manual_seed(0)
cfg = AutoConfig.from_pretrained("assets/smollm2")
AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).save_pretrained("assets/smollm2")
print("gpu-check: SmolLM2-135M built from its config with seeded random weights "
      "(its package is not installed here); the throughput below does not depend on them")
PYEOF
fi
"$PY" -m compress.assets assets --lm >/dev/null

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

failed=()
run() { [[ " ${GPU_CHECK_STEPS:-1 2 3} " == *" $1 "* ]]; }  # GPU_CHECK_STEPS="3": that one only
if run 1; then
echo; echo "== 1. bitsandbytes on CUDA (8/4-bit stage, CUDA memory on the card, 8-bit teacher) =="
"$PY" -m pytest -q -p no:cacheprovider tests/integration/test_bnb.py \
    tests/integration/test_llm_task.py -k "bnb or int8" || failed+=(1)
fi

if run 2; then
echo; echo "== 2. one distill stage on the GPU (cached top-k KD, bf16 autocast) =="
"$PY" -m pytest -q -p no:cacheprovider tests/integration/test_causal_lm.py \
    -k "cached_topk or half_precision" || failed+=(2)
fi

if run 3; then
echo; echo "== 3. LM distillation throughput, bf16, live vs cached teacher, compile off/on =="
"$PY" benchmarks/distill_throughput.py --lm --steps "${GPU_STEPS:-60}" \
    --batch-size "${GPU_BATCH:-16}" \
    --compile both "${peak_arg[@]}" || failed+=(3)
fi

echo; echo "gpu-check: done in $(( $(date +%s) - start )) s on $name (bf16 peak ${peak} TFLOP/s)"
if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu-check: step(s) ${failed[*]} failed"
    exit 1
fi
