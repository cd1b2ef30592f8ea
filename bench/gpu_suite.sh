#!/usr/bin/env bash
# Everything issue #20 measures on a GPU, in one run of under 8 minutes on one H200, ending in one table:
# the GPU tests (local layers and, where transformer_engine is installed, Transformer Engine's), training
# TFLOP/s and peak memory of steerlm vs HF transformers on a 1B and an 8-layer 8B-shaped Llama (bf16, fp32
# master weights), and decoding tokens/s vs HF `generate` at batch 1 and 32 (1B, bf16).
#
#   bash bench/gpu_suite.sh            # results under $OUT (default /tmp/steerlm_gpu_suite)
#   SUITE_SHAPES=smoke bash bench/gpu_suite.sh   # the same stages on the tiny preset, on any machine: a check of
#                                                # the suite itself, run by tests/test_gpu_suite.py on CPU
#
# Offline machines: the Python packages the machine lacks travel as wheels in .whl/ (git-ignored; how to
# build them: docs/performance.md) and are installed into /tmp/site. Each stage has its own time limit, so the
# table is printed even when one stage runs long; a stage that failed or ran out of time shows as such.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/steerlm_gpu_suite}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD"
SHAPES=${SUITE_SHAPES:-gpu}
if [[ $SHAPES == smoke ]]; then  # the environment at hand: nothing installed, a few seconds a stage
    TRAIN_1B=(--preset tiny --seq-length 64 --warmup 1 --steps 1)
    TRAIN_8B_8L=(--preset tiny --layers 1 --seq-length 64 --warmup 1 --steps 1)
    GENERATE_1B=(--preset tiny --dtype bf16 --batch-sizes 1 32 --prompt-tokens 16 --new-tokens 4 --repeats 1)
elif [[ $SHAPES == gpu ]]; then
    TRAIN_1B=(--preset llama3_2_1b --seq-length 4096 --warmup 3 --steps 10)
    TRAIN_8B_8L=(--preset llama3_8b --layers 8 --seq-length 4096 --warmup 3 --steps 5)
    GENERATE_1B=(--preset llama3_2_1b --dtype bf16 --batch-sizes 1 32 --prompt-tokens 512 --new-tokens 128 --repeats 1)
else
    echo "SUITE_SHAPES=$SHAPES: give gpu (the default) or smoke" >&2
    exit 2
fi
if [[ $SHAPES == gpu ]] && compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { echo "installing .whl/ failed" >&2; exit 1; }
    export PYTHONPATH="/tmp/site:$PWD"
fi
start=$SECONDS
nvidia-smi -L 2>/dev/null || echo "no nvidia-smi: not a GPU machine"
"$PYTHON" -c "import torch, megatron.core, transformers; print('torch', torch.__version__, '| megatron-core', \
megatron.core.__version__, '| transformers', transformers.__version__)" 2>&1 | grep -v -i warn

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit; output appended to $OUT/log.txt, exit status
    local name=$1 limit=$2 log=$STAGE_LOG  # to $OUT/status.txt (at most 8 files come back, so the log is elsewhere)
    shift 2
    echo "== $name (limit ${limit}s, at $((SECONDS - start))s)"
    timeout "$limit" "$@" >"$log" 2>&1
    echo "$name $?" >>"$OUT/status.txt"
    { echo "==== $name"; cat "$log"; } >>"$OUT/log.txt"
    grep -v -i -e warn -e "^ *warnings.warn" "$log" | tail -n 12
}

rm -f "$OUT/status.txt" "$OUT/log.txt"
STAGE_LOG=$(mktemp)
trap 'rm -f "$STAGE_LOG"' EXIT
stage tests 230 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/tests.xml" \
    tests/gpu tests/test_megatron_compat.py tests/test_parallel_parity.py tests/test_adapters.py
# SFT steps (#20's target): half of every row is prompt, which steerlm's loss leaves out of the output layer
stage train_1b 110 "$PYTHON" bench/train_throughput.py "${TRAIN_1B[@]}" --prompt-fraction 0.5 \
    --json "$OUT/train_1b.json"
stage train_8b_8l 100 "$PYTHON" bench/train_throughput.py "${TRAIN_8B_8L[@]}" --prompt-fraction 0.5 \
    --json "$OUT/train_8b_8l.json"
stage generate_1b 110 "$PYTHON" bench/generate_throughput.py "${GENERATE_1B[@]}" --json "$OUT/generate_1b.json"
echo "== done in $((SECONDS - start))s"
"$PYTHON" bench/gpu_table.py "$OUT" | tee "$OUT/table.md"
