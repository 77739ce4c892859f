#!/usr/bin/env bash
# Wheels and assets for `make gpu-check` on a GPU machine that reaches no package index.
#
# Usage: bash benchmarks/gpu_wheels.sh [WHEEL_DIR=.whl] [ASSET_DIR=.gpu-assets] [PYVER=3.12]
# Fetches, for the GPU machine's Python, the packages gpu_check.sh pins (versions from
# constraints.txt, no dependencies: the machine's torch stays), keeps only the CPU and CUDA 13
# libraries of bitsandbytes (its wheel is 43 MB, mostly CUDA 11/12 builds), and copies the small
# assets (SmolLM2's config and tokenizer without its 538 MB of weights, Hamlet, the movie
# instructions). Then, on the GPU machine: GPU_WHEELS=.whl GPU_ASSETS=.gpu-assets make gpu-check
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${1:-.whl}
ASSETS=${2:-.gpu-assets}
PYVER=${3:-3.12}
PY=${PY:-.venv/bin/python}
source benchmarks/gpu_packages.sh
# Both folders are replaced on each run, so only folders this script made (it leaves a marker)
# or new ones: never a folder of someone else's files.
MARK=.made-by-gpu_wheels
for d in "$WHEELS" "$ASSETS"; do
    if [ -e "$d" ] && [ ! -e "$d/$MARK" ]; then
        echo "gpu_wheels: $d exists and was not made by this script; name a new folder" >&2
        exit 2
    fi
done
pins=()
for dist in $GPU_OFFLINE; do
    pins+=("$(pin "$dist")")
done
rm -rf "$WHEELS"
mkdir -p "$WHEELS" && touch "$WHEELS/$MARK"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" "${pins[@]}"
"$PY" - "$WHEELS" <<'PYEOF'
import sys, zipfile
from pathlib import Path

# bitsandbytes: drop every native library but the CPU and CUDA 13 ones (and their RECORD rows).
for whl in Path(sys.argv[1]).glob("bitsandbytes-*.whl"):
    keep = lambda n: not n.endswith(".so") or n.endswith(("_cpu.so", "_cuda130.so", "_cuda132.so"))
    slim = whl.with_suffix(".slim")
    with zipfile.ZipFile(whl) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if not keep(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"\n".join(r for r in data.split(b"\n")
                                  if keep(r.split(b",")[0].decode()))
            dst.writestr(info, data)
    before = whl.stat().st_size
    slim.replace(whl)
    print(f"bitsandbytes wheel: {before / 2**20:.1f} -> {whl.stat().st_size / 2**20:.1f} MiB "
          "(CPU and CUDA 13 libraries only)")
PYEOF
rm -rf "$ASSETS"
mkdir -p "$ASSETS/smollm2" && touch "$ASSETS/$MARK"
"$PY" -m compress.assets assets --lm >/dev/null
for f in assets/smollm2/*; do
    [ "$(basename "$f")" = model.safetensors ] || cp "$f" "$ASSETS/smollm2/"
done
cp assets/hamlet.txt assets/movie-instruct.csv "$ASSETS/"
du -sh "$WHEELS" "$ASSETS"
