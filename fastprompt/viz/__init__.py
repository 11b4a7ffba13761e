"""Figures and readings of a finished run: `fastprompt plot ...` and `fastprompt interpret`.

- `attention`: last-layer class-token attention over patches, zero-shot CLIP vs the run
  (the CAVPT paper's Figures 1 and 4);
- `tsne`: t-SNE of test image features, zero-shot vs the run (the E2MIM paper's Figure 2);
- `curves`: loss, accuracy and learning rate per parameter group from `metrics.jsonl`;
- `interpret`: CoOp's nearest-word reading of learned context vectors;
- `compare`: zero-shot vs trained accuracy of runs, as a table (the demo's last step).

matplotlib (Agg) and scikit-learn are imported on first use, so `import fastprompt` stays light.
"""
