#!/usr/bin/env bash
# The one command to run on a GPU machine (CUDA, torch >= 2.11 and Triton >= 3.6 installed, no
# internet, no FFCV): in about 9 minutes (each step has a time limit; the GPU steps' limits sum to
# 890 s, more than one 600 s device call: split it with --only, see below) it
#   1. runs the kernel tests on the GPU and the bf16 fast-vs-reference parity test of every
#      method (tests/kernels, tests/methods/test_bf16_parity.py);
#   2. runs `fastprompt bench` on synthetic images for ViT-B/32 and ViT-B/16 at batch 128,
#      variants reference, fast, fast+compile and anchor (images/s, peak memory, useful
#      TFLOP/s, fraction of the GPU's bf16 peak); the baselines ivlp, maple, cocoop, kgcoop,
#      prograd and promptsrc on ViT-B/16 at batch 32, 100 classes, fast against their released-style anchors;
#      packed steps (`bench --pack 1,8`): coop and vpt-deep, 8 runs of batch 32 on ViT-B/16 against 1;
#   3. runs the prefix-attention and cosine-CE microbenchmarks against SDPA / eager;
#   4. writes gpu-check.json and gpu-check.md (plus each step's log) into FOLDER.
# Every step runs under its own time limit and is recorded even when an earlier one failed;
# the exit status is 1 when a step failed or a test did not pass.
#
#   scripts/gpu-check.sh FOLDER                 # on the GPU machine
#   scripts/gpu-check.sh --cpu-dry-run FOLDER   # the same steps at tiny shapes on CPU (Triton's
#                                               # interpreter, fastprompt-tiny; no fast+compile)
#   scripts/gpu-check.sh --only STEP,... FOLDER  # only these steps (and `machine`), e.g. two calls
#     within 600 s each: --only tests,bench-ViT-B-32,bench-ViT-B-16,bench-baselines (540 s)
#     then --only bench-pack,micro,tests-cuda-graphs,tests-fp32 (410 s, `machine` in each) into the same FOLDER
# Wheels: open_clip, typer, pytest, ... are installed from .whl/ (scripts/gpu-wheels.sh
# downloads them where PyPI is reachable) into /tmp/site; torch is never reinstalled.
# PYTHON picks the interpreter (default: .venv/bin/python where it exists, else python3).
set -uo pipefail

usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
MODE=gpu
OUT=""
ONLY=""
want_only=0
for arg in "$@"; do
    if [ "$want_only" = 1 ]; then ONLY=",$arg,"; want_only=0; continue; fi
    case "$arg" in
        --cpu-dry-run) MODE=cpu-dry-run ;;
        --only) want_only=1 ;;
        -h|--help) usage ;;
        -*) echo "gpu-check: unknown option $arg" >&2; usage ;;
        *) [ -z "$OUT" ] || { echo "gpu-check: one FOLDER, got $OUT and $arg" >&2; exit 2; }; OUT=$arg ;;
    esac
done
[ "$want_only" = 0 ] || { echo "gpu-check: --only needs a comma-separated list of steps" >&2; exit 2; }
[ -n "$OUT" ] || { echo "gpu-check: give the output FOLDER" >&2; usage; }
if [ "$MODE" = gpu ]; then
    STEPS="tests bench-ViT-B-32 bench-ViT-B-16 bench-baselines bench-pack micro tests-cuda-graphs tests-fp32"
else
    STEPS="tests bench-fastprompt-tiny bench-pack micro"
fi
for name in ${ONLY//,/ }; do
    case " $STEPS " in *" $name "*) ;; *) echo "gpu-check: --only: no step '$name' in $MODE mode; steps: $STEPS" >&2; exit 2 ;; esac
done
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac  # relative to where it was called from
cd "$(dirname "$0")/.."
# the project's interpreter when a checkout has one (scripts/setup.sh's .venv), else python3
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo "$PWD/.venv/bin/python" || echo python3)}
COMMAND="scripts/gpu-check.sh $*"
echo "[gpu-check] python: $PY"

if [ "$MODE" = gpu ]; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        echo "[gpu-check] installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into /tmp/site"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            || { echo "gpu-check: installing .whl/ failed" >&2; exit 2; }
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "[gpu-check] no .whl/ here: using what $PY already has (scripts/gpu-wheels.sh fetches the wheels)"
    fi
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || { echo "gpu-check: torch sees no CUDA device; run with --cpu-dry-run on a CPU machine" >&2; exit 2; }
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # fastprompt from this checkout
mkdir -p "$OUT" || exit 2
if [ -z "$ONLY" ]; then
    : > "$OUT/steps.tsv"
else  # a later call into the same FOLDER: keep the other steps' records, replace these
    touch "$OUT/steps.tsv"
    awk -F'\t' -v only="$ONLY" 'index(only, "," $1 ",") == 0 && $1 != "machine"' "$OUT/steps.tsv" > "$OUT/steps.tsv.kept"
    mv "$OUT/steps.tsv.kept" "$OUT/steps.tsv"
fi

# step NAME LIMIT_S COMMAND...: run it with a time limit, log to FOLDER/NAME.log, record it.
step() {
    local name=$1 limit=$2
    shift 2
    if [ -n "$ONLY" ] && [ "$name" != machine ] && [[ "$ONLY" != *",$name,"* ]]; then return 0; fi
    echo "[gpu-check] $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local command="$*"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$limit" "${command//[$'\t\n']/ }" >> "$OUT/steps.tsv"
    echo "[gpu-check] $name: exit $rc after $((SECONDS - start))s"
}

step machine 60 "$PY" scripts/gpu_check_report.py machine "$OUT" --mode "$MODE" --command "$COMMAND"

if [ "$MODE" = gpu ]; then
    # The gpu-marked kernel tests (the others run Triton's CPU interpreter) and the bf16 parity
    # test; the fp32 kernel cases last (IEEE fp32 dots compile 10-100x slower: ptxas spills).
    step tests 150 "$PY" -m pytest -v -p no:cacheprovider tests/methods/test_bf16_parity.py tests/kernels \
        --ignore=tests/kernels/test_aot.py -k "(gpu or bf16_parity) and not float32"
    for clip in ViT-B-32 ViT-B-16; do
        methods=$([ "$clip" = ViT-B-32 ] && echo vpt-deep,coop-text || echo vpt-deep,cavpt)
        step "bench-$clip" 90 "$PY" -m fastprompt.cli bench --clip "$clip" --pretrained none --batch-size 128 \
            --classes 1000 --methods "$methods" --variants reference,fast,fast+compile,anchor --steps 5 --warmup 2 \
            --device cuda --json "$OUT/bench-$clip.json"
    done
    # The field's baselines (issues 22-23) against their anchors in the released code's style: IVLP and MaPLe
    # (77-token prompts, a cat per layer), CoCoOp (one 77-token pass of K prompts per image), KgCoOp (a second
    # hand-crafted text pass), ProGrad (a second image pass), PromptSRC (IVLP's anchor and a second image pass);
    # fast and anchor only, to fit the device time
    step bench-baselines 150 "$PY" -m fastprompt.cli bench --clip ViT-B-16 --pretrained none --batch-size 32 \
        --classes 100 --methods ivlp,maple,cocoop,kgcoop,prograd,promptsrc --variants fast,anchor --steps 5 --warmup 2 \
        --device cuda --json "$OUT/bench-baselines.json"
    # Packed runs (issue 24): 8 runs of batch 32 in one step against 1 run (goal: >= 4x the total images/s)
    step bench-pack 60 "$PY" -m fastprompt.cli bench --clip ViT-B-16 --pretrained none --batch-size 32 \
        --classes 100 --methods coop,vpt-deep --variants fast --pack 1,8 --steps 3 --warmup 1 \
        --device cuda --json "$OUT/bench-pack.json"
    step micro 80 "$PY" -m pytest -q -p no:cacheprovider benchmarks/bench_prefix_attention.py benchmarks/bench_cosine_ce.py \
        --benchmark-only --benchmark-json="$OUT/micro.json" -k "bf16 and fwd_bwd and not large and not sdpa-math and not compiled"
    # --compile reduce-overhead: each method's step as CUDA graphs, none skipped, equal to eager (issue 15 §3)
    step tests-cuda-graphs 150 "$PY" -m pytest -v -p no:cacheprovider tests/training/test_cuda_graphs.py
    step tests-fp32 60 "$PY" -m pytest -v -p no:cacheprovider tests/kernels --ignore=tests/kernels/test_aot.py -k "gpu and float32"
else
    step tests 300 "$PY" -m pytest -v -p no:cacheprovider tests/methods/test_bf16_parity.py tests/kernels/test_compile.py \
        -k "vpt-deep or fullgraph"
    # one method of each kind of bench workload (fastprompt.bench.workloads): image-side prompts, the CoOp text
    # step, a baseline with its released-style anchor, a gradient rule's step; every method's anchor against the
    # reference is tests/test_anchor.py's (the other four baselines here cost ~8 s of CPU and no code path)
    step bench-fastprompt-tiny 300 "$PY" -m fastprompt.cli bench --clip fastprompt-tiny --pretrained none --batch-size 4 \
        --classes 5 --methods vpt-deep,coop-text,maple,prograd --variants reference,fast,anchor --steps 1 --warmup 0 --device cpu \
        --json "$OUT/bench-fastprompt-tiny.json"
    step bench-pack 120 "$PY" -m fastprompt.cli bench --clip fastprompt-tiny --pretrained none --batch-size 4 \
        --classes 5 --methods coop,vpt-deep --variants fast --pack 1,2 --steps 1 --warmup 0 --device cpu \
        --json "$OUT/bench-pack.json"
    step micro 300 "$PY" -m pytest -q -p no:cacheprovider benchmarks/bench_prefix_attention.py benchmarks/bench_cosine_ce.py \
        --benchmark-only --benchmark-json="$OUT/micro.json" -k "fwd_bwd and not compiled and not text and not wgrad and (triton or math or eager)"
fi
"$PY" scripts/gpu_check_report.py report "$OUT" --mode "$MODE"
