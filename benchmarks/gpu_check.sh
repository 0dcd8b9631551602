#!/usr/bin/env bash
# Every check that needs a GPU, as one script for a GPU machine lent for a few minutes without a
# network (its image has torch, pyarrow, fsspec, pytest, but not DeepSpeed, diffusers or open_clip).
#
#   benchmarks/gpu_check.sh fetch   here, with a package index: wheels of what such an image lacks,
#                                   at constraints.txt's versions, into .whl/ (about 14 MiB)
#   benchmarks/gpu_check.sh run     there: installs .whl/ (if present) beside the image's torch, then
#                                   the step benchmark (small fp32; the SD-2-base-sized UNet in bf16 at
#                                   batch 64, compiled block by block with activation checkpointing:
#                                   samples/s, TFLOP per step, MFU, engine/plain, compiled/eager) and
#                                   the tests that compare GPU with CPU results;
#                                   figures and logs under $OUT (default gpu-check/), at most 6 files
#
# PYTHON (default python3) runs everything. SMALL_ARGS and SD_ARGS replace the two benchmark runs'
# arguments, to fit the minutes left; the defaults take about 6 minutes on an H200.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CARRIED="deepspeed diffusers open_clip_torch ftfy wcwidth hjson pydantic pydantic_core annotated-types typing-inspection importlib_metadata"
SMALL_ARGS=${SMALL_ARGS:---steps 30 --rounds 2}
SD_ARGS=${SD_ARGS:---model sd --precision bf16 --batch-size 64 --steps 40 --rounds 2 --compile blocks --activation-checkpointing blocks}

pinned() {  # name==version as constraints.txt pins it
    grep -i -E "^$(echo "$1" | sed 's/[-_]/[-_]/g')==" constraints.txt || { echo "constraints.txt does not pin $1" >&2; exit 2; }
}

fetch() {
    local python=${PYTHON:-.venv/bin/python}
    mkdir -p .whl
    local wheels=() name
    for name in $CARRIED; do [ "$name" = deepspeed ] || wheels+=("$(pinned "$name")"); done
    # the image's Python is 3.12 on x86-64: binary wheels for that, whatever this machine runs
    $python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${wheels[@]}" || exit 1
    # DeepSpeed publishes only a source archive; its wheel is pure Python (kernels build on first use)
    $python -m pip download -q --no-deps --no-binary=:all: -d .whl/src "$(pinned deepspeed)" || exit 1
    $python -m pip wheel -q --no-deps --no-build-isolation -w .whl .whl/src/deepspeed-*.tar.gz || exit 1
    rm -rf .whl/src
    du -sh .whl
}

run() {
    local out=${OUT:-gpu-check} status=0
    mkdir -p "$out"
    if compgen -G ".whl/*.whl" >/dev/null; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/unclip-site .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/unclip-site${PYTHONPATH:+:$PYTHONPATH}
    fi
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 TORCH_EXTENSIONS_DIR=/tmp/unclip-torch-extensions
    (nvidia-smi || echo "no nvidia-smi") >"$out/nvidia-smi.txt" 2>&1
    # shellcheck disable=SC2086  # the argument strings are meant to split
    $PY benchmarks/train_step.py $SMALL_ARGS --json "$out/step_small.json" 2>&1 | tee "$out/step_small.log" || status=1
    # shellcheck disable=SC2086
    $PY benchmarks/train_step.py $SD_ARGS --json "$out/step_sd.json" 2>&1 | tee "$out/step_sd.log" || status=1
    $PY -m pytest -p no:cacheprovider -rs tests/test_decoder.py tests/test_previews.py tests/test_loader.py \
        -k "where_its or previews or page_locked" 2>&1 | tee "$out/tests.log" || status=1
    exit $status
}

case "${1:-}" in
    fetch) fetch ;;
    run) run ;;
    *) sed -n '2,13p' "$0"; exit 2 ;;
esac
