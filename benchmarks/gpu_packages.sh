# Sourced by gpu_check.sh and gpu_wheels.sh: which packages the GPU check lays over a machine's
# own torch, and their pins (constraints.txt), in one place so the two scripts cannot disagree.
#
# GPU_PINNED: installed at our version even when the machine has one (a newer transformers, say,
# changes behaviour). GPU_IF_MISSING: only when absent. GPU_OFFLINE: what an offline machine
# lacks (the image `make gpu-check` ran on had everything else; gpu_wheels.sh fetches these).
GPU_PINNED="transformers tokenizers huggingface_hub torch-pruning bitsandbytes datasets pydantic \
pydantic_core annotated-types typing-inspection"
GPU_IF_MISSING="dill multiprocess accelerate safetensors pyyaml psutil rich typer tqdm fsspec \
xxhash pyarrow pandas regex filelock packaging requests"
GPU_OFFLINE="$GPU_PINNED dill multiprocess"

# pin NAME: its "name==version" line from constraints.txt (- and _ alike), or nothing.
pin() {
    grep -i -E "^${1//[-_]/[-_]}==" constraints.txt | head -1 || true
}
