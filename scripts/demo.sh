#!/usr/bin/env bash
# The main job: what prompt tuning does, on the built-in demo data, on CPU in a few minutes.
#  1. draw the demo set (10 colour-shape classes photographed under a warm lamp) and pretrain
#     the demo CLIP (fastprompt-tiny on colour-shape captions that never name a demo class);
#  2. zero-shot accuracy of that CLIP on the demo test split;
#  3. few-shot (16 images per class) CoOp, VPT-deep and CAVPT;
#  4. the zero-shot -> tuned table and the CAVPT run's figures.
# Extra arguments go to every `fastprompt train` (e.g. --device cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
FP=.venv/bin/fastprompt
DEMO=runs/demo
mkdir -p "$DEMO"

echo "== 1. the demo set and the demo CLIP (both are functions of their seed, 0)"
"$FP" prepare demo --out "$DEMO/demo.beton" --overwrite
"$FP" prepare demo-clip --out "$DEMO/demo-clip.pt" --overwrite
CLIP=(--clip fastprompt-tiny --pretrained "$DEMO/demo-clip.pt")

echo "== 2. zero-shot CLIP on the demo test split (chance: 10 %)"
"$FP" zeroshot --data "$DEMO/demo.beton" "${CLIP[@]}" --device cpu

echo "== 3. few-shot prompt tuning: 16 images per class, 10 epochs"
for method in coop vpt-deep cavpt; do
    rm -rf "${DEMO:?}/$method"
    "$FP" train --method "$method" --data "$DEMO/demo.beton" "${CLIP[@]}" --shots 16 --seed 1 \
        --optimizer adamw --lr 0.01 --weight-decay 0 --epochs 10 --warmup-epochs 0 --out "$DEMO/$method" "$@"
done

echo "== 4. zero-shot -> tuned"
"$FP" compare "$DEMO/coop" "$DEMO/vpt-deep" "$DEMO/cavpt" --json "$DEMO/compare.json"
echo "figures of the CAVPT run:"
"$FP" plot attention "$DEMO/cavpt" --images 4
"$FP" plot tsne "$DEMO/cavpt"
"$FP" plot curves "$DEMO/cavpt"
