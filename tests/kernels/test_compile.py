"""Both kernels are torch custom ops: `torch.compile(fullgraph=True)` traces a function that
calls them without a graph break (fullgraph raises on any break), forward and backward, and
the compiled function computes what eager does. On CPU the compile backend is aot_eager
(AOTAutograd traces the registered autograd and fake kernels; inductor's C++ compile would
cost a minute of the suite); the gpu test uses inductor."""

import pytest
import torch
from _util import relative_error

from fastprompt.kernels import cosine_cross_entropy, cosine_cross_entropy_reference, prefix_attention, prefix_attention_reference


def tiny_head(q, k, v, prefix_k, prefix_v, w, scale, target, *, impl):
    """A text-tower-like attention with a shared prefix, pooled, then a cosine-logit loss."""
    o = prefix_attention(q, k, v, prefix_k, prefix_v, causal=True, impl=impl)  # (B, H, N, d)
    feats = o.mean(dim=2).flatten(1)  # (B, H * d)
    return cosine_cross_entropy(feats, w, target, scale, impl=impl)


def reference_head(q, k, v, prefix_k, prefix_v, w, scale, target):
    o = prefix_attention_reference(q, k, v, prefix_k, prefix_v, causal=True)  # (B, H, N, d)
    return cosine_cross_entropy_reference(o.mean(dim=2).flatten(1), w, target, scale)


def make_args(device="cpu"):
    gen = torch.Generator().manual_seed(0)
    B, H, N, P, d, C = 3, 2, 7, 2, 16, 5
    tensors = [torch.randn(B, H, N, d, generator=gen) for _ in range(3)]  # q, k, v: (B, H, N, d)
    tensors += [torch.randn(1, H, P, d, generator=gen) for _ in range(2)]  # prefix: (1, H, P, d)
    tensors += [torch.randn(C, H * d, generator=gen), torch.tensor(4.0)]  # w (C, H*d), scale ()
    leaves = [t.to(device).requires_grad_() for t in tensors]
    return leaves, torch.randint(0, C, (B,), generator=gen).to(device)


def loss_and_grads(fn, leaves, target, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    loss = fn(*leaves, target, **kwargs)
    return [loss.detach(), *torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("impl", ["triton", "auto"])
def test_fullgraph_compile_matches_eager(impl):
    torch._dynamo.reset()
    leaves, target = make_args()
    compiled = torch.compile(tiny_head, fullgraph=True, backend="aot_eager")
    got = loss_and_grads(compiled, leaves, target, impl=impl)
    eager = loss_and_grads(tiny_head, leaves, target, impl=impl)
    want = loss_and_grads(reference_head, leaves, target)
    for a, e, r in zip(got, eager, want):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)
        assert relative_error(a, r) <= 1e-4


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) kernels, autograd registration and AOT dispatch of all four ops."""
    q, k, v, pk, pv, w, scale = make_args()[0]
    out, lse = torch.ops.fastprompt.prefix_attention_fwd(q, k, v, pk, pv, True, 0.25)
    x = torch.randn(4, 16, requires_grad=True)
    target = torch.tensor([0, 4, 2, 1])
    cases = [
        (torch.ops.fastprompt.prefix_attention_fwd.default, (q, k, v, pk, pv, True, 0.25)),
        (torch.ops.fastprompt.prefix_attention_bwd.default,
         tuple(t.detach() for t in (torch.randn_like(out), q, k, v, pk, pv, out, lse)) + (True, 0.25)),
        (torch.ops.fastprompt.cosine_cross_entropy_fwd.default, (x, w[:, :16], target, scale)),
        (torch.ops.fastprompt.cosine_cross_entropy_fwd.default, (x, w[:, :16], torch.softmax(torch.randn(4, 5), -1), scale)),
    ]
    saved = torch.ops.fastprompt.cosine_cross_entropy_fwd(x.detach(), w[:, :16].detach(), target, scale.detach())
    cases.append((torch.ops.fastprompt.cosine_cross_entropy_bwd.default,
                  (torch.tensor(1.0), x.detach(), w[:, :16].detach(), target, scale.detach(), *saved[1:], True, False)))
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fullgraph_inductor_on_gpu():
    torch._dynamo.reset()
    leaves, target = make_args("cuda")
    compiled = torch.compile(tiny_head, fullgraph=True)
    got = loss_and_grads(compiled, leaves, target, impl="auto")
    eager = loss_and_grads(tiny_head, leaves, target, impl="auto")
    for a, e in zip(got, eager):
        assert relative_error(a, e) <= 1e-4
