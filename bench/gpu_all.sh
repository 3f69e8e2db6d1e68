#!/usr/bin/env bash
# Every GPU check of the project in one run, written up as ONE Markdown report for docs/benchmarks.md.
#
#   bench/gpu_all.sh                 # on one H100/H200: < 8 minutes; report in $OUT/gpu_report.md when $OUT is
#                                    # set (the device tool's output folder), else bench_out/gpu_report.md
#   bench/gpu_all.sh --smoke         # the same sections on the CPU (each script's --cpu-smoke, a tiny test
#                                    # subset): proves the script end to end; the numbers mean nothing
#   bench/gpu_all.sh --report FILE   # write the report somewhere else
#   bench/gpu_all.sh --only vllm_150m,vllm_1b   # only these sections (e.g. the vLLM ones, in a call of their own)
#
# Sections, each under its own timeout; a failing or timed-out section is recorded and the run goes on; the
# exit status is non-zero when any section failed:
#   tests         pytest tests/kernels tests/test_model.py on CUDA (compiled kernels; bf16 where the tests have it)
#   attention     bench/attention.py --quick: ours (pre-pass + each core) vs unfused chains, D 64/128, S 1k-16k
#   ops           bench/ops.py: rms_norm / swiglu GB/s vs copy bandwidth, linear cross-entropy time and memory
#   resources     bench/kernel_resources.py: registers, spills and shared memory of every kernel config (AOT)
#   mfu           bench/mfu.py on llama-1b.toml: sdpa vs fused_qknorm_rope, without and with torch.compile
#   generate      bench/generate.py, the GPU row: a 0.8B model, batch 32, ours vs transformers
#   vllm_150m     bench/vllm_synthesis.py: SBP synthesis tokens/s, ours vs --backend vllm, a ~150M synthesizer
#   vllm_1b       the same for a ~1B synthesizer (both skipped where this Python has no vLLM)
# Environment: PYTHON (default .venv/bin/python when present, else python3).
set -u -o pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
SMOKE=0
REPORT=""
ONLY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) SMOKE=1 ;;
        --report) REPORT=$2; shift ;;
        --only) ONLY=$2; shift ;;
        -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench/gpu_all.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [ -z "$REPORT" ]; then REPORT="${OUT:-bench_out}/gpu_report.md"; fi
mkdir -p "$(dirname "$REPORT")"
LOGS="$(dirname "$REPORT")/gpu_all_logs"
mkdir -p "$LOGS"
BODY=$(mktemp)
SUMMARY=$(mktemp)
trap 'rm -f "$BODY" "$SUMMARY"' EXIT
FAILED=0
START=$(date +%s)

# run_section NAME TIMEOUT_S KIND COMMAND...   KIND: md (stdout is Markdown) or text (shown in a code block)
run_section() {
    local name=$1 limit=$2 kind=$3
    shift 3
    if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then
        return
    fi
    echo "== $name (limit ${limit}s): $*" >&2
    local t0 rc status
    t0=$(date +%s)
    timeout --kill-after=15 "$limit" "$@" >"$LOGS/$name.out" 2>"$LOGS/$name.err"
    rc=$?
    local took=$(( $(date +%s) - t0 ))
    case $rc in
        0) status=PASS ;;
        124|137) status="FAIL (timed out after ${limit}s)"; FAILED=1 ;;
        *) status="FAIL (exit $rc)"; FAILED=1 ;;
    esac
    echo "== $name: $status in ${took}s" >&2
    echo "| $name | $status | $took | \`$*\` |" >>"$SUMMARY"
    {
        echo
        echo "## $name: $status, ${took} s"
        echo
        echo "\`$*\`"
        echo
        if [ "$kind" = md ]; then
            sed 's/^#\{1,2\} /### /' "$LOGS/$name.out"  # the scripts' own headings go under this section's
        else
            echo '```text'
            tail -n 40 "$LOGS/$name.out"
            echo '```'
        fi
        if [ $rc -ne 0 ]; then
            echo
            echo "stderr (last 25 lines):"
            echo
            echo '```text'
            tail -n 25 "$LOGS/$name.err"
            echo '```'
        fi
    } >>"$BODY"
}

skip_section() {
    if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$1,"* ]]; then
        return
    fi
    echo "| $1 | skipped: $2 | 0 | |" >>"$SUMMARY"
}

# The vLLM rows: ours against --backend vllm on the same prompts. vLLM is an optional extra (pip install
# 'megasynth[vllm]'); VLLM_PYTHON names a Python that has it (default: PYTHON, or .venv-vllm on the CPU).
vllm_sections() {
    local vpy=$1
    shift
    if ! "$vpy" -c 'import vllm' >/dev/null 2>&1; then
        skip_section vllm_150m "no vLLM in $vpy (pip install 'megasynth[vllm]')"
        skip_section vllm_1b "no vLLM in $vpy"
        return
    fi
    "$@"
}

if [ $SMOKE -eq 1 ]; then
    # The CPU: every script's --cpu-smoke and a handful of interpreter tests; kernels via TRITON_INTERPRET=1.
    export TRITON_INTERPRET=1
    run_section tests 300 text "$PYTHON" -m pytest -q -p no:cacheprovider -rfE \
        tests/kernels/test_attention_core.py tests/kernels/test_attention.py tests/test_model.py \
        -k "choose_core or eps_must_be_positive or gqa2-d64-causal-fp32 or empty_and_single or norm_eps or attention_core_is_validated"
    run_section attention 300 md "$PYTHON" bench/attention.py --cpu-smoke
    run_section ops 300 md "$PYTHON" bench/ops.py --cpu-smoke
    if [ -f bench/kernel_resources.py ]; then
        run_section resources 300 md "$PYTHON" bench/kernel_resources.py --quick --kernels qknorm_rope --arch 90
    else
        skip_section resources "bench/kernel_resources.py is not in this checkout"
    fi
    run_section mfu 400 md "$PYTHON" bench/mfu.py --cpu-smoke --micro-batch-size 2 --seq-len 64 --accum 1 \
        --steps 1 --warmup 0
    run_section generate 200 md "$PYTHON" bench/generate.py --device cpu --dim 64 --layers 2 --heads 2 \
        --kv-heads 1 --ffn 128 --vocab 512 --batch 2 --prompt-len 8 --new-tokens 8 --repeats 1
    smoke_vllm() {
        run_section vllm_150m 300 md "$PYTHON" bench/vllm_synthesis.py --device cpu --backends ours,vllm \
            --vllm-python "$VLLM_PYTHON" --dim 64 --layers 2 --heads 2 --kv-heads 1 --ffn 128 --vocab 512 \
            --corpus-docs 300 --docs 8 --batch 4 --seed-tokens 16 --new-tokens 8
    }
    VLLM_PYTHON=${VLLM_PYTHON:-.venv-vllm/bin/python}
    vllm_sections "$VLLM_PYTHON" smoke_vllm
else
    if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "bench/gpu_all.sh: no CUDA device (use --smoke on the CPU)" >&2
        exit 2
    fi
    # The limits add up to 540 s, so one 10-minute device call always gets its report back; a normal run
    # stays well inside them. A section that times out still reports what it printed (attention prints the
    # configurations it finished; mfu prints one row per variant as it goes).
    # test_kernel_resources.py is the ahead-of-time analysis, which needs no GPU (the CPU suite runs it); the
    # resources section below prints the same table.
    run_section tests 130 text "$PYTHON" -m pytest -q -p no:cacheprovider -rfE --durations=10 \
        tests/kernels tests/test_model.py --ignore=tests/kernels/test_kernel_resources.py
    run_section attention 120 md "$PYTHON" bench/attention.py --quick
    run_section ops 45 md "$PYTHON" bench/ops.py --min-time 0.05
    if [ -f bench/kernel_resources.py ]; then
        run_section resources 60 md "$PYTHON" bench/kernel_resources.py --quick
    else
        skip_section resources "bench/kernel_resources.py is not in this checkout"
    fi
    run_section mfu 135 md "$PYTHON" bench/mfu.py --steps 4 --warmup 2
    run_section generate 45 md "$PYTHON" bench/generate.py --device cuda --dtype bfloat16 --dim 2048 \
        --layers 16 --batch 32 --repeats 2
    # Random weights: the rates are what counts. vLLM compiles and captures CUDA graphs (a minute or two), so
    # with vLLM present the limits add up to 870 s: run `--only vllm_150m,vllm_1b` in a call of its own.
    gpu_vllm() {
        run_section vllm_150m 150 md "$PYTHON" bench/vllm_synthesis.py --device cuda --dtype bfloat16 \
            --backends ours,vllm --vllm-python "${VLLM_PYTHON:-$PYTHON}" --dim 768 --layers 16 --heads 12 --kv-heads 4 --ffn 2560 --vocab 8192 \
            --corpus-docs 3000 --docs 1024 --batch 128 --seed-tokens 128 --new-tokens 256 --max-num-seqs 256 \
            --kv-cache-gib 16
        run_section vllm_1b 180 md "$PYTHON" bench/vllm_synthesis.py --device cuda --dtype bfloat16 \
            --backends ours,vllm --vllm-python "${VLLM_PYTHON:-$PYTHON}" --dim 2048 --layers 20 --heads 16 --kv-heads 8 --ffn 5632 --vocab 8192 \
            --corpus-docs 3000 --docs 1024 --batch 128 --seed-tokens 128 --new-tokens 256 --max-num-seqs 256 \
            --kv-cache-gib 16
    }
    vllm_sections "${VLLM_PYTHON:-$PYTHON}" gpu_vllm
fi
TOTAL=$(( $(date +%s) - START ))

machine() {
    if command -v nvidia-smi >/dev/null 2>&1 && [ $SMOKE -eq 0 ]; then
        echo '```text'
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>&1
        echo '```'
    else
        echo "- CPU: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | sed 's/^ //')"
    fi
    "$PYTHON" - <<'EOF' 2>&1
import importlib, platform, torch
def version(name):
    try:
        return getattr(importlib.import_module(name), "__version__", "installed")
    except Exception as exc:  # noqa: BLE001
        return f"not importable ({type(exc).__name__})"
cudnn = torch.backends.cudnn.version() if torch.cuda.is_available() else None
print(f"- Python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {cudnn}), "
      f"triton {version('triton')}, flash-attn {version('flash_attn')}, FA3 flash_attn_interface "
      f"{version('flash_attn_interface')}")
EOF
}

{
    if [ $SMOKE -eq 1 ]; then
        echo "# GPU checks: CPU smoke run (the numbers mean nothing)"
    else
        echo "# GPU checks on $("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null)"
    fi
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO" diff --quiet 2>/dev/null || echo ' (with uncommitted changes)'), by \`bench/gpu_all.sh$([ $SMOKE -eq 1 ] && echo ' --smoke')\`."
    echo
    machine
    echo
    echo "| section | result | seconds | command |"
    echo "|---|---|---:|---|"
    cat "$SUMMARY"
    echo
    echo "Total: ${TOTAL} s. Raw logs: \`$LOGS\`."
    cat "$BODY"
} >"$REPORT"

echo "bench/gpu_all.sh: report in $REPORT (${TOTAL}s); $([ $FAILED -eq 0 ] && echo 'every section passed' || echo 'SOME SECTIONS FAILED')" >&2
exit $FAILED
