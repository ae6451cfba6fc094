#!/usr/bin/env bash
# Every GPU figure for docs/performance.md in one call: at most 8 minutes on one NVIDIA H200, each stage's JSON
# written to OUT as soon as the stage finishes.
#
#   bash benchmarks/gpu_wheels.sh            # first, where PyPI is reachable: the wheels the GPU machine lacks -> .whl/
#   bash benchmarks/gpu_suite.sh OUT         # on the GPU machine, .whl/ sent along with the repository tree
#   bash benchmarks/gpu_suite.sh --smoke OUT # rehearsal on a CPU: the current environment, tiny shapes, 2-3 minutes
#   python benchmarks/plot_gpu.py OUT --plot docs/performance_gpu.png   # afterwards: tables and plot
#
# The GPU machine starts bare (python 3.12, torch 2.11 with CUDA, transformers 5.17, below this package's floor) and
# reaches no index, so the suite installs .whl/ into /tmp/site and imports tokenpacker_hf from src/. --smoke skips
# that and runs every stage with tiny shapes on the CPU. Environment: PYTHON (default python3), BUDGET_S (450).
#
# Stages, bf16 and SDPA unless noted; OUT/<stage>.json, the stage's output in OUT/logs/<stage>.log, and in
# OUT/suite.json every stage's exit status, seconds and limit:
#   env        versions, device, compiler for torch.compile, pyproject's requirements; the suite stops if one is unmet
#   projector  bench_projector.py: the projector against the original nn.MultiheadAttention formulation at CLIP-L/336
#              + Vicuna-7B shapes, batch 1, 8, 32, fp32 and bf16, achieved FLOP/s against an 8192² matmul's rate
#              measured in the same run (target: >= 2x faster at batch 1)
#   sdpa       bench_gpu_extras.py sdpa: the SDPA backend the region attention takes, each backend alone
#   e2e        bench_e2e.py: TTFT, decode tokens/s, KV bytes of LLaVA-1.5 (576 tokens) vs TokenPacker s=2,3,4 with a
#              Vicuna-7B-shaped LLM against the FLOP-predicted ratios; HD slices vs LLaVA-NeXT anyres
#   train      bench_gpu_extras.py train: stage-2 steps/s at batch 8, LLaVA-1.5 vs TokenPacker s=2
#   compile    bench_gpu_extras.py compile: torch.compile (default, reduce-overhead) vs eager
#   report     plot_gpu.py: OUT/report.md, the markdown tables of all of the above (--smoke: also OUT/gpu.png)
# Each stage runs under `timeout` with its own cap, cut to what the whole run's BUDGET_S leaves, so one stage
# overrunning costs only itself. Estimated on an H200: install and env 30 s, projector 40, sdpa 25, e2e 120,
# train 50, compile 90 (Triton compiles on a cold machine), report 10.
set -uo pipefail  # no -e: a failed stage is recorded and the next one runs

SMOKE=0
if [ "${1:-}" = "--smoke" ]; then SMOKE=1; shift; fi
if [ $# -ne 1 ]; then
  echo "usage: bash benchmarks/gpu_suite.sh [--smoke] OUT" >&2
  exit 2
fi
mkdir -p "$1/logs"
OUT=$(cd "$1" && pwd)  # absolute: the stages run from the repository root, not from where the suite was called
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-450}  # of the 8 minutes: the rest is the machine's start and the transfers
REPORT_RESERVE_S=30
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

if [ $SMOKE = 1 ]; then
  DEVICE=cpu
  FLAGS=(--smoke --device cpu)
  export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
else
  DEVICE=cuda
  FLAGS=(--device cuda)
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "no wheels in .whl/: run 'bash benchmarks/gpu_wheels.sh' where PyPI is reachable and send .whl/ along" >&2
    exit 2
  fi
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
fi

# Printed before any stage imports tokenpacker_hf, so a broken environment still says what it is.
"$PYTHON" -c "
import platform, torch, transformers
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'
print(f'python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), '
      f'transformers {transformers.__version__}, {gpu}')" || exit 1

printf '{"smoke": %s, "device": "%s", "budget_s": %s, "stages": {}}\n' \
  "$([ $SMOKE = 1 ] && echo true || echo false)" "$DEVICE" "$BUDGET_S" >"$OUT/suite.json"

record() {  # STAGE RC SECONDS LIMIT: adds the stage to OUT/suite.json (RC "skipped" when no time was left)
  "$PYTHON" - "$OUT/suite.json" "$@" <<'EOF'
import json, sys
from pathlib import Path
path, stage, rc, seconds, limit = sys.argv[1:]
suite = json.loads(Path(path).read_text())
suite["stages"][stage] = {"rc": None if rc == "skipped" else int(rc), "seconds": int(seconds), "limit_s": int(limit),
                          "timed_out": rc in ("124", "137")}
Path(path).write_text(json.dumps(suite, indent=1) + "\n")
EOF
}

FAILED=0
stage() {  # NAME CAP_S COMMAND...: runs COMMAND under a time limit, logs it, records it; returns its status
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET_S - SECONDS))
  if [ "$name" != report ]; then left=$((left - REPORT_RESERVE_S)); fi
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 5 ]; then
    echo "== $name: skipped, the budget is spent"
    record "$name" skipped 0 0
    FAILED=1
    return 1
  fi
  local start=$SECONDS rc
  timeout --kill-after=5 "$limit" "$@" >"$OUT/logs/$name.log" 2>&1
  rc=$?
  record "$name" "$rc" $((SECONDS - start)) "$limit"
  echo "== $name: exit $rc after $((SECONDS - start)) s (limit $limit s)"
  if [ $rc -ne 0 ]; then
    FAILED=1
    tail -n 25 "$OUT/logs/$name.log"
  fi
  return $rc
}

if ! stage env 60 "$PYTHON" benchmarks/bench_gpu_extras.py env "${FLAGS[@]}" --out "$OUT/env.json"; then
  echo "environment check failed: no measurements" >&2
  exit 1
fi
cat "$OUT/logs/env.log"

PROJECTOR=(--dtypes fp32 bf16 --batches 1 8 32)
E2E=()
COMPILE=()
if [ $SMOKE = 0 ]; then
  PROJECTOR+=(--repeats 100 --budget-s 5 --matmul-size 8192)
  E2E+=(--dtype bf16 --llm 7b --repeats 5 --batch-repeats 3 --hd-repeats 3)
else
  COMPILE+=(--batches 1)  # each batch compiles anew: one is enough to rehearse, and a CPU compile takes long
fi
stage projector 90 "$PYTHON" benchmarks/bench_projector.py "${FLAGS[@]}" "${PROJECTOR[@]}" --out "$OUT/projector.json"
stage sdpa 60 "$PYTHON" benchmarks/bench_gpu_extras.py sdpa "${FLAGS[@]}" --out "$OUT/sdpa.json"
stage e2e 210 "$PYTHON" benchmarks/bench_e2e.py "${FLAGS[@]}" "${E2E[@]}" --out "$OUT/e2e.json"
stage train 120 "$PYTHON" benchmarks/bench_gpu_extras.py train "${FLAGS[@]}" --out "$OUT/train.json"
stage compile 150 "$PYTHON" benchmarks/bench_gpu_extras.py compile "${FLAGS[@]}" "${COMPILE[@]}" --out "$OUT/compile.json"
REPORT=()
if [ $SMOKE = 1 ]; then REPORT+=(--plot "$OUT/gpu.png"); fi  # the GPU machine has no matplotlib: plot here later
stage report 45 "$PYTHON" benchmarks/plot_gpu.py "$OUT" --markdown "$OUT/report.md" "${REPORT[@]}" && cat "$OUT/report.md"
echo "total $SECONDS s of a $BUDGET_S s budget; results in $OUT"
exit $FAILED
