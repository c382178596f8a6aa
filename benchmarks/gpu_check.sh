#!/usr/bin/env bash
# The GPU check in one call of the lent GPU machine, run from the repository root:
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--root DIR]      # OUT=dir (default ./gpu_check_out)
#
# 1. train.py's headline command on the mini copy, on the GPU, for as many epochs as TRAIN_S
#    seconds of training allow (trainer.max_time), then its test;
# 2. benchmarks/bench.py on the GPU with full-size synthetic images (host cost per step included);
# 3. benchmarks/compile_check.py: eager against torch.compile (default, reduce-overhead = CUDA
#    graphs, max-autotune) in ms per step at batch 32 and 512;
# 4. one JSON, $OUT/gpu_check.json: the run's metrics.json and wall seconds, bench.py's and
#    compile_check.py's JSON lines, the headline command's projected 100 epochs at batch 32 from
#    the default path's rate, the GPU's name; beside it train.log, bench.log and compile.log.
#
# There, .device/ (carried; ignored by git) holds Hydra's wheels, installed into /tmp/site when
# Hydra is missing, and cifar10-jpeg-mini.tar.xz, extracted when no --root is given. Every step has a time limit and all of them end by DEADLINE_S; a step that
# fails or runs out of time is recorded in the JSON, and the script then exits 1.
# --dry-run (or DRY_RUN=1): the same steps on the CPU with tiny settings, for tests.
set -uo pipefail

DRY_RUN=${DRY_RUN:-0}
ROOT_DIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --root) ROOT_DIR=${2:?--root needs a folder}; shift ;;
    *) echo "gpu_check: unknown argument $1 (use --dry-run, --root DIR)" >&2; exit 2 ;;
  esac
  shift
done

PY=${PYTHON:-python3}
OUT=${OUT:-./gpu_check_out}
TRAIN_S=${TRAIN_S:-120}        # trainer.max_time: the epochs are as many as fit in it
BENCH_S=${BENCH_S:-180}        # the longest bench.py may run
COMPILE_S=${COMPILE_S:-120}    # the longest compile_check.py may run
DEADLINE_S=${DEADLINE_S:-540}  # the whole script, under the 10-minute call
COMPILE_ARGS=(--device cuda)
if [ "$DRY_RUN" = 1 ]; then
  TRAIN_S=20 BENCH_S=120 COMPILE_S=120 DEADLINE_S=300
  COMPILE_ARGS=(--device cpu --batches 32 --steps 2 --images 2048 --model airbench)
  ACCEL=cpu BENCH_ARGS=(--tiny --synthetic --device cpu)
  # one epoch of two batches; 0:00:00:20 would stop a longer one
  TRAIN_ARGS=(trainer.max_epochs=1 +trainer.limit_train_batches=2 +trainer.limit_val_batches=1 +trainer.limit_test_batches=1)
else
  ACCEL=gpu BENCH_ARGS=(--synthetic --device cuda)
  TRAIN_ARGS=(trainer.max_epochs=-1)
fi
START=$(date +%s)
left() { echo $(( START + DEADLINE_S - $(date +%s) )); }
mkdir -p "$OUT" || exit 1
WORK=$(mktemp -d -t gpu-check-XXXXXX) || exit 1
trap 'rm -rf "$WORK"' EXIT

if ! "$PY" -c "import hydra" 2>/dev/null; then
  timeout 120 "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .device/*.whl || { echo "gpu_check: Hydra is missing and .device/*.whl did not install" >&2; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

if [ -z "$ROOT_DIR" ]; then
  if [ -f .device/cifar10-jpeg-mini.tar.xz ]; then
    ROOT_DIR=$WORK/mini
    timeout 120 "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \
      .device/cifar10-jpeg-mini.tar.xz "$ROOT_DIR" || { echo "gpu_check: could not extract .device/cifar10-jpeg-mini.tar.xz" >&2; exit 1; }
  elif [ -d .device/train ]; then
    ROOT_DIR=.device
  else
    echo "gpu_check: no data: pass --root DIR, or put cifar10-jpeg-mini.tar.xz in .device/" >&2; exit 1
  fi
fi

MAX_TIME=$(printf '00:00:%02d:%02d' $((TRAIN_S / 60)) $((TRAIN_S % 60)))
TRAIN_CMD=("$PY" train.py data=image_folder "data.root=$ROOT_DIR" "trainer.accelerator=$ACCEL" "trainer.max_time=$MAX_TIME"
           "${TRAIN_ARGS[@]}" "paths.log_dir=$WORK/logs" "paths.data_dir=$WORK/data" callbacks.progress_bar=null)
# Decoding the images, validation and the test come on top of TRAIN_S; bench.py gets the rest.
TRAIN_LIMIT=$(( TRAIN_S + 120 ))
[ "$TRAIN_LIMIT" -gt $(( $(left) - 60 )) ] && TRAIN_LIMIT=$(( $(left) - 60 ))
[ "$TRAIN_LIMIT" -lt 1 ] && TRAIN_LIMIT=1  # timeout 0 would mean no limit
T0=$(date +%s%N)
timeout -k 10 "$TRAIN_LIMIT" "${TRAIN_CMD[@]}" >"$OUT/train.log" 2>&1
TRAIN_RC=$?
TRAIN_MS=$(( ($(date +%s%N) - T0) / 1000000 ))

BENCH_LIMIT=$BENCH_S
[ "$BENCH_LIMIT" -gt $(( $(left) - 5 )) ] && BENCH_LIMIT=$(( $(left) - 5 ))
if [ "$BENCH_LIMIT" -gt 0 ]; then
  timeout -k 10 "$BENCH_LIMIT" "$PY" benchmarks/bench.py "${BENCH_ARGS[@]}" --data-dir "$WORK/bench-data" >"$OUT/bench.log" 2>&1
  BENCH_RC=$?
else
  echo "gpu_check: no time left for bench.py" >"$OUT/bench.log"; BENCH_RC=124
fi

COMPILE_LIMIT=$COMPILE_S
[ "$COMPILE_LIMIT" -gt $(( $(left) - 5 )) ] && COMPILE_LIMIT=$(( $(left) - 5 ))
if [ "$COMPILE_LIMIT" -gt 0 ]; then
  timeout -k 10 "$COMPILE_LIMIT" "$PY" benchmarks/compile_check.py "${COMPILE_ARGS[@]}" >"$OUT/compile.log" 2>&1
  COMPILE_RC=$?
else
  echo "gpu_check: no time left for compile_check.py" >"$OUT/compile.log"; COMPILE_RC=124
fi

GPU=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
METRICS=$(ls "$WORK"/logs/train/runs/*/metrics.json 2>/dev/null | head -1)
"$PY" - "$OUT" "$METRICS" "$TRAIN_RC" "$TRAIN_MS" "$BENCH_RC" "$COMPILE_RC" "$GPU" "$DRY_RUN" "$MAX_TIME" "$START" "${TRAIN_CMD[@]}" <<'EOF'
"""Merge the steps into $OUT/gpu_check.json."""
import json
import sys
import time
from pathlib import Path

out, metrics, train_rc, train_ms, bench_rc, compile_rc, gpu, dry_run, max_time, start, *train_cmd = sys.argv[1:]


def last_json(log):
    lines = (Path(out) / log).read_text(errors="replace").strip().splitlines()
    try:
        return json.loads(lines[-1]), None
    except (IndexError, json.JSONDecodeError):
        return None, lines[-1] if lines else "no output"


bench, bench_error = last_json("bench.log")
compiled, compile_error = last_json("compile.log")
rate = (bench or {}).get("images_per_s", {}).get("32")
result = {
    "dry_run": dry_run == "1",
    "gpu": gpu or None,
    "train": {
        "command": " ".join(train_cmd[1:]),
        "max_time": max_time,
        "rc": int(train_rc),
        "wall_s": round(int(train_ms) / 1000, 1),
        "metrics": json.loads(Path(metrics).read_text()) if metrics else None,
    },
    "bench": bench,
    "bench_rc": int(bench_rc),
    "bench_error": bench_error,
    "compile": compiled,
    "compile_rc": int(compile_rc),
    "compile_error": compile_error,
    # the headline command (batch 32, 100 epochs of 45,000 images) at the default path's rate, training only
    "headline_100_epochs_s": round(100 * 45_000 / rate, 1) if rate else None,
    "total_wall_s": round(time.time() - int(start), 1),
}
(Path(out) / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps({k: result[k] for k in ("gpu", "bench_rc", "total_wall_s")} | {"train_rc": result["train"]["rc"]}))
sys.exit(0 if result["train"]["rc"] == 0 and bench and int(bench_rc) == 0 and compiled and int(compile_rc) == 0 else 1)
EOF
