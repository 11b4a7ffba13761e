#!/usr/bin/env bash
# The main job on the built-in demo data: set this machine up, draw the demo set, train CAVPT
# with the tiny config and random weights, print the final accuracy.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p runs
[ -f runs/demo.beton ] || .venv/bin/fastprompt prepare demo --out runs/demo.beton
rm -rf runs/demo-cavpt
.venv/bin/fastprompt train --method cavpt --data runs/demo.beton \
    --clip fastprompt-tiny --pretrained none \
    --optimizer adamw --lr 0.01 --weight-decay 0 --epochs 15 --warmup-epochs 0 \
    --out runs/demo-cavpt "$@"
