"""The workload of one (method, variant): its model on the shared frozen CLIP, its inputs
(random images or cached text-side features, random labels, CAVPT's top-K) and the step
function that computes (loss, logits); `train_step` runs forward, backward and SGD. A method
with a gradient rule (ProGrad) steps as the trainer does: its step computes (loss terms,
logits) and `backward` writes the rule's gradients (the anchor: the released arithmetic)."""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from fastprompt.bench.anchor import Anchor
from fastprompt.bench.config import TEXT_STEP, BenchConfig
from fastprompt.losses import cosine_ce
from fastprompt.methods import create_model
from fastprompt.methods.base import term_gradients
from fastprompt.training.compiled import compile_fn, compile_step
from fastprompt.training.pack import Pack


@dataclass
class Workload:
    step: Callable  # (*inputs) -> (loss, logits)
    inputs: tuple
    params: list  # trainable tensors the optimiser steps
    autocast: Callable  # () -> context manager
    precision: str
    model: torch.nn.Module
    backward: Optional[Callable] = None  # (loss terms) -> None, writes .grad; None: loss.backward()
    pack: Optional[Pack] = None  # packed runs: `step(*inputs)` is the pack's whole step (backward and SGD in it)
    runs: int = 1  # runs a step trains (batch_size images each)


def build(method: str, variant: str, master, cfg: BenchConfig, device: torch.device) -> Workload:
    """Model, inputs and step function of one (method, variant), on `device`."""
    cuda = device.type == "cuda"
    anchor = variant == "anchor"
    half = anchor and cuda  # CoOp's prec="fp16": the whole model in fp16
    clip = copy.deepcopy(master).to(device) if cuda else master  # CPU: one shared copy (memory is a delta)
    if half:
        clip = clip.half()
    classnames = [f"class {i}" for i in range(cfg.classes)]
    torch.manual_seed(cfg.seed)  # the same prompt initialisation in every variant
    model_method = "coop" if method == TEXT_STEP else method
    backend = "reference" if variant in ("reference", "anchor") else "fast"
    model = create_model(model_method, classnames, clip=clip, pretrained=None, backend=backend, device=device)
    model.train()
    if half:
        model.half()
    dtype = torch.float16 if half else torch.float32
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda and not anchor else nullcontext
    precision = "fp16 (model.half)" if half else ("bf16 autocast" if cuda else "fp32")
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    labels = torch.randint(0, cfg.classes, (cfg.batch_size,), generator=gen).to(device)  # (B,)
    params = [p for p in model.parameters() if p.requires_grad]

    if method == TEXT_STEP:
        feats = F.normalize(torch.randn(cfg.batch_size, model.bundle.embed_dim, generator=gen), dim=-1)  # (B, D)
        feats = feats.to(device, dtype)
        if anchor:
            runner = Anchor(model)

            def step(x, y):
                w = runner.text_features()  # (K, D): 77 tokens, every class
                logits = model.clip.logit_scale.exp() * x @ w.t()  # (B, K)
                return F.cross_entropy(logits, y), logits.detach()
        else:
            def step(x, y):
                w = model.text_features()  # (K, D)
                return cosine_ce(x, w, y, model.logit_scale(), model.backend), w.detach()

            if variant == "fast+compile":
                step = compile_fn(step, cfg.compile_mode, device=device)
        return Workload(step, (feats, labels), params, autocast, precision, model)

    size = model.bundle.image_size
    images = torch.randn(cfg.batch_size, 3, size, size, generator=gen).to(device, dtype)  # (B, 3, H, W)
    inputs: tuple = (images, labels)
    wants_topk = model.wants_topk_table()
    if wants_topk:
        with torch.no_grad(), autocast():
            topk = model.zero_shot_topk(images)  # (B, K_N): what topk_source="cached" supplies
        inputs = (images, labels, topk)
    rule = model.gradient_rule()
    if rule is not None:  # the step gives the loss terms; backward writes the rule's gradients, as the trainer
        if anchor:
            runner = Anchor(model)
            step, backward = runner.loss_terms, (lambda terms: runner.rule_backward(terms, params))
        else:
            step = compile_fn(model.loss_terms, cfg.compile_mode, device=device) if variant == "fast+compile" \
                else model.loss_terms

            def backward(terms):
                for p, g in zip(params, rule.combine(term_gradients(terms, rule.terms, params))):
                    p.grad = g
        return Workload(step, inputs, params, autocast, precision, model, backward)
    if anchor:
        step = Anchor(model).loss_and_logits
    elif variant == "fast+compile":
        compiled = compile_step(model, cfg.compile_mode)
        step = (lambda x, y, k: compiled(x, y, topk=k)) if wants_topk else compiled
    else:
        step = model.loss_and_logits
    return Workload(step, inputs, params, autocast, precision, model)


def build_pack(method: str, variant: str, master, cfg: BenchConfig, device: torch.device, runs: int,
               optimizer: Callable) -> Workload:
    """`runs` runs of `method` packed (`fastprompt.training.pack.Pack`) on one frozen CLIP: each its own
    prompt initialisation (seed + n), fused SGD (`optimizer(params)`) and batch of random images; the
    fast+compile variant compiles the packed step, as a solo step's."""
    cuda = device.type == "cuda"
    clip = copy.deepcopy(master).to(device) if cuda else master
    classnames = [f"class {i}" for i in range(cfg.classes)]
    backend = "reference" if variant == "reference" else "fast"
    models = []
    for n in range(runs):
        torch.manual_seed(cfg.seed + n)
        models.append(create_model(method, classnames, clip=clip, pretrained=None, backend=backend, device=device))
        models[-1].train()
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else nullcontext
    pack = Pack(models, [optimizer([p for p in m.parameters() if p.requires_grad]) for m in models],
                compile_mode=cfg.compile_mode if variant == "fast+compile" else None, autocast=autocast)
    size = models[0].bundle.image_size
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    images = [torch.randn(cfg.batch_size, 3, size, size, generator=gen).to(device) for _ in range(runs)]  # (B, 3, H, W) each
    labels = [torch.randint(0, cfg.classes, (cfg.batch_size,), generator=gen).to(device) for _ in range(runs)]  # (B,) each

    def step(x, y):
        return pack.step(x, y, 0), None

    params = [p for m in models for p in m.parameters() if p.requires_grad]
    return Workload(step, (images, labels), params, nullcontext, "bf16 autocast" if cuda else "fp32",
                    torch.nn.ModuleList(models), pack=pack, runs=runs)


def train_step(work: Workload, optimizer: Optional[torch.optim.Optimizer]) -> None:
    """One training step of `work`: forward, and with an optimiser backward and its step (a
    pack's step does all three for every run)."""
    if work.pack is not None:
        work.step(*work.inputs)
        return
    with work.autocast():
        loss, _logits = work.step(*work.inputs)  # loss terms with a gradient rule
    if optimizer is not None:
        if work.backward is not None:
            work.backward(loss)
        else:
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def state_bytes(work: Workload, optimizer) -> int:
    """Bytes of what a variant keeps resident between steps: its model's parameters and
    buffers (frozen CLIP included), the optimiser state and the batch."""
    seen, total = set(), 0
    inputs = [t for x in work.inputs for t in (x if isinstance(x, list) else [x]) if torch.is_tensor(t)]
    tensors = [*work.model.parameters(), *work.model.buffers(), *inputs]
    optimizers = [optimizer] if work.pack is None else work.pack.optimizers
    for opt in (o for o in optimizers if o is not None):
        tensors += [t for state in opt.state.values() for t in state.values() if torch.is_tensor(t)]
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total
