"""Learning: on the demo set every method beats chance by at least 20 points of training accuracy.

Prompt tuning adapts what a pretrained CLIP knows, so these runs start from the demo CLIP
(`fastprompt prepare demo-clip`: fastprompt-tiny pretrained on colour-shape captions that
never name a demo class), not from random weights, where shared prompts have nothing to
adapt (measured: VPT stays at 10 %). Because that CLIP already ranks the demo's class names
well, accuracy alone would not show that training *did* anything; so each run must also cut
its training loss (last epoch against first) by at least 25 %, which a run whose optimiser
does not move, or moves the wrong way, cannot do. The budget is the demo job's: AdamW at
lr 0.01, no warm-up, 5 epochs of 5 steps. Measured (2026-11-22, this suite's fixtures):
last/first loss 0.26 (vpt-deep) to 0.64 (vpt-shallow), final training accuracy 80-96 %.
"""

import json

import pytest

import fastprompt
from fastprompt.training import TrainConfig, train

CHANCE = 100.0 / 10  # ten demo classes
# maple's default context is "a photo of a" with coupled visual prompts: on this CLIP it is at
# 94 % after the first epoch's 5 steps and its loss goes 0.224 -> 0.169 (-24.5 %, measured
# 2026-12-07), too little room to tell learning from noise; from a random context (the
# released code's other initialisation) it goes 1.42 -> 0.53, 55 % -> 92.5 %.
# cocoop's default "a photo of a" too (95.6 % after the first epoch, loss 0.174 -> 0.194), and 4
# random tokens (0.184 -> 0.195: so is coop's, the class names carry it); from 16 random tokens
# (its released vit_b16_c16_ep10_batch1.yaml) it goes 0.899 -> 0.234, 72.5 % -> 95.6 % (measured 2026-12-08).
# kgcoop's default "a photo of a" too (95 % after the first epoch, loss 0.185 -> 0.201, measured
# 2026-12-07); from 16 random tokens (the released code without CTX_INIT) it goes 5.70 -> 2.20 (CE
# plus 8 x the gap to the template features), 50 % -> 94.4 % (measured 2026-12-07).
OPTIONS = {"maple": {"ctx_init": None}, "cocoop": {"ctx_init": None, "n_ctx": 16},
           "kgcoop": {"ctx_init": None, "n_ctx": 16}}


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow  # the demo CLIP fixture pretrains for ~30 s, then a 5-epoch run per method
@pytest.mark.parametrize("method", [m for m in fastprompt.list_methods() if m != "zeroshot"])
def test_every_method_learns_on_the_demo(method, demo_beton, demo_clip, tmp_path):
    out = tmp_path / "run"
    config = TrainConfig(method=method, data=str(demo_beton), out=str(out), clip="fastprompt-tiny",
                         pretrained=str(demo_clip), epochs=5, warmup_epochs=0, optimizer="adamw", lr=0.01,
                         weight_decay=0.0, num_workers=1, device="cpu", compile="off", options=OPTIONS.get(method, {}))
    train(config)
    metrics = _lines(out / "metrics.jsonl")
    first, last = metrics[0], metrics[-1]
    assert last["train_accuracy"] >= CHANCE + 20, metrics
    assert last["loss"] <= 0.75 * first["loss"], metrics
