"""`--compile reduce-overhead` on a GPU: the training step of every method runs as CUDA graphs
(issue 15 §3), the part the CPU suite cannot check. Run by `scripts/gpu-check.sh`; skipped
without CUDA.

The loop is the trainer's: gradients zeroed before the forward, `cudagraph_mark_step_begin`,
forward and backward through the compiled step (inductor's cudagraph trees capture both
graphs), the fused SGD with a device-tensor lr, the running sums on the device. Checked:
inductor skipped no graph ("skipping cudagraphs" bumps `cudagraph_skips`: a CPU input, a
mutated input, a data-dependent op), the prompts after three steps equal the eager loop's, and
a new lr is taken without a recompile.
"""

import copy

import pytest
import torch
from _util import CLASSNAMES, relative_error

import fastprompt
from fastprompt.training.compiled import compile_step

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")]

CASES = [
    ("coop", {"n_ctx": 4}),
    ("vpt-deep", {}),
    ("vlp", {"n_ctx": 4}),
    ("cavpt", {"topk": 3, "aux_target": "gt-only", "topk_source": "online"}),
    ("cavpt", {"topk": 3, "variant": "released", "text_prompt": True, "n_ctx": 4, "guidance_epochs": 1}),
    ("e2mim", {"n_ctx": 4, "mixup": False}),  # mixup's random draws: see the next test
]


def _loop(model, step, batches, lrs, cuda_graphs):
    params = [p for p in model.parameters() if p.requires_grad]
    lr = torch.tensor(lrs[0], dtype=torch.float32, device="cuda")
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4, fused=True)
    total = torch.zeros((), dtype=torch.float64, device="cuda")
    for (images, labels), value in zip(batches, lrs):
        lr.fill_(value)
        opt.zero_grad(set_to_none=True)
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss, _logits = step(images, labels)
        total += loss.detach().double()
        loss.backward()
        opt.step()
    return total, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _batches(n=3, batch=8, size=64):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, size, size, generator=g).cuda(), torch.randint(0, 5, (batch,), generator=g).cuda())
            for _ in range(n)]


@pytest.mark.parametrize("method, options", CASES, ids=lambda v: v if isinstance(v, str) else "-".join(
    f"{k}={x}" for k, x in v.items() if k in ("variant", "aux_target")) or "default")
def test_gpu_reduce_overhead_step_is_cuda_graphs_and_equals_eager(method, options, tiny_clip):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = fastprompt.create_model(method, CLASSNAMES, clip=copy.deepcopy(tiny_clip).cuda(), pretrained=None,
                                    **options).cuda().train()
    compiled = copy.deepcopy(eager)
    batches, lrs = _batches(), [0.01, 0.01, 0.005]  # the lr changes: new data in the same tensor
    want_total, want = _loop(eager, eager.loss_and_logits, batches, lrs, cuda_graphs=False)
    step = compile_step(compiled, "reduce-overhead", fullgraph=True)
    total, got = _loop(compiled, step, batches, lrs, cuda_graphs=True)
    torch.cuda.synchronize()
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert relative_error(total, want_total) <= 1e-3
    for name in want:
        assert relative_error(got[name], want[name]) <= 1e-3, name
    torch._dynamo.reset()


def test_gpu_e2mim_mixup_draws_replay_inside_cuda_graphs(tiny_clip):
    """E2MIM's class-wise pairs and λ are drawn inside the captured graphs (`randperm`, the Beta
    sample): the graphs are not skipped and every replay draws afresh (the losses of identical
    batches differ), finite."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = fastprompt.create_model("e2mim", CLASSNAMES, clip=copy.deepcopy(tiny_clip).cuda(), pretrained=None,
                                    n_ctx=4).cuda().train()
    step = compile_step(model, "reduce-overhead", fullgraph=True)
    images, labels = _batches(n=1)[0]
    losses = []
    for _ in range(4):
        torch.compiler.cudagraph_mark_step_begin()
        loss, _ = step(images, labels)
        loss.backward()
        losses.append(loss.detach().clone())
    losses = torch.stack(losses)  # (4,)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert torch.isfinite(losses).all() and losses.unique().numel() > 1, losses
    torch._dynamo.reset()
