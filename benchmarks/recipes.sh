#!/usr/bin/env bash
# The README's 10-minute comparison: experiment=cpu10 against the tutorial's recipe exactly as
# the tutorial runs it (experiment=tutorial) with the same 10 minutes (trainer.max_time). The
# runs go one after the other: at once they would share the cores.
#   bash benchmarks/recipes.sh <image folder with train/<class>/ and test/<class>/> [log dir]
set -euo pipefail
root=${1:?usage: bash benchmarks/recipes.sh <image folder root> [log dir]}
logs=${2:-logs/recipes}
mkdir -p "$logs"

run() {
    local name=$1
    shift
    local start
    start=$(date +%s)
    python train.py data=image_folder data.root="$root" paths.log_dir="$logs/$name" "$@"
    echo "$name $(($(date +%s) - start))" >>"$logs/wall_seconds.txt"
}

run cpu10 experiment=cpu10
run tutorial experiment=tutorial trainer.max_time=00:00:10:00

python - "$logs" <<'EOF'
import json, sys
from pathlib import Path

logs = Path(sys.argv[1])
wall = dict(line.split() for line in (logs / "wall_seconds.txt").read_text().splitlines())
print("| run | test accuracy | training seconds | training images/s | epochs | steps | wall seconds |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for name in ("cpu10", "tutorial"):
    m = json.loads(sorted((logs / name).glob("train/runs/*/metrics.json"))[-1].read_text())
    print(f"| {name} | {m['test/acc']:.2%} | {m['train/seconds']:.0f} | {m['train/images_per_s']:.0f} "
          f"| {m['epochs']} | {m['steps']} | {wall[name]} |")
EOF
