"""What `fastprompt bench` measures: `BenchConfig`, the variants and the method names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from fastprompt.errors import FastpromptError
from fastprompt.methods import list_methods
from fastprompt.runtime import SEED_MAX, resolve_device
from fastprompt.training.compiled import COMPILE_MODES
from fastprompt.validation import check_choice, check_int

VARIANTS = ("reference", "fast", "fast+compile", "anchor")
TEXT_STEP = "coop-text"  # the CoOp text step alone (text encoder of all classes + loss + backward)


# the default grid: the text side (the CoOp text step) and the image side (VPT-deep), the oracle
# against the fast path, 2 timed steps after 1 warm-up: about 2 minutes with ViT-B-32 on 2 quiet
# CPU cores (BENCHMARKS.md; a reference CoOp text step alone takes ~20 s there). Every method and
# variant (compilation and the anchor baselines too): `fastprompt bench --all`.
DEFAULT_METHODS = (TEXT_STEP, "vpt-deep")
DEFAULT_VARIANTS = ("reference", "fast")


def bench_methods() -> list[str]:
    """What `--methods` accepts: every method and `coop-text`."""
    return [*list_methods(), TEXT_STEP]


@dataclass
class BenchConfig:
    clip: str = "ViT-B-32"  # open_clip model name or fastprompt-tiny
    pretrained: Optional[str] = None  # None: random weights (throughput does not depend on them)
    batch_size: int = 16  # images per step
    classes: int = 100  # simulated classes, named "class 0" .. "class N-1"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    methods: tuple[str, ...] = DEFAULT_METHODS  # bench_methods(): all
    variants: tuple[str, ...] = DEFAULT_VARIANTS  # VARIANTS: all
    steps: int = 2  # timed steps per variant (the median is reported); 2 keeps the default grid near 2 minutes on CPU
    warmup: int = 1  # untimed steps before them
    compile_mode: str = "default"  # torch.compile mode of the fast+compile variant
    seed: int = 0
    # runs per packed step (fastprompt.training.pack), e.g. (1, 2, 4, 8): each packing method's reference / fast /
    # fast+compile variant at each N, N runs of batch_size images a step; 1 is the solo step. (): no pack dimension
    packs: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.methods = tuple(self.methods)
        self.variants = tuple(self.variants)
        known = bench_methods()
        bad = [m for m in self.methods if m not in known]
        if bad or not self.methods:
            raise FastpromptError(f"unknown method {', '.join(map(repr, bad)) or '(none given)'} for bench; choose from: {', '.join(known)}")
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad or not self.variants:
            raise FastpromptError(f"unknown variant {', '.join(map(repr, bad)) or '(none given)'}; choose from: {', '.join(VARIANTS)}")
        check_int("batch_size", self.batch_size)
        check_int("classes", self.classes)
        check_int("steps", self.steps)
        check_int("warmup", self.warmup, minimum=0)
        check_int("seed", self.seed, minimum=0, maximum=SEED_MAX)
        check_choice("compile_mode", self.compile_mode, COMPILE_MODES)
        self.packs = tuple(self.packs)
        for n in self.packs:
            check_int("pack", n, maximum=256)
        if len(set(self.packs)) != len(self.packs):
            raise FastpromptError(f"pack={','.join(map(str, self.packs))} names a size twice; list each number of runs once")
        if isinstance(self.pretrained, str) and self.pretrained.lower() == "none":
            self.pretrained = None
        resolve_device(self.device)
