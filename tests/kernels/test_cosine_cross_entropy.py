"""cosine_cross_entropy: the fused Triton path against normalize + matmul + F.cross_entropy,
loss and the gradients to x, w and scale. On CPU the kernels run under TRITON_INTERPRET=1
(set in tests/conftest.py) at small shapes; the `gpu` tests use B 256, C 1000, D 512 and the
largest supported size (B 4096, C 20000).

Tolerances: fp32 relative error (max|a - b| / max|b|, tests/_util.py) <= 1e-4. Low precision:
the error against the fp32 reference is at most 2x that of the eager reference run in the
same dtype (flash-attention's rule).
"""

import importlib

import pytest
import torch
from _util import relative_error

from fastprompt.errors import FastpromptError
from fastprompt.kernels import cosine_cross_entropy, cosine_cross_entropy_reference

ce_module = importlib.import_module("fastprompt.kernels.cosine_cross_entropy")  # the attribute is the function

NAMES = ("loss", "dx", "dw", "dscale")


def make_inputs(B, C, D, soft, *, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=gen)  # (B, D)
    w = torch.randn(C, D, generator=gen)  # (C, D)
    if soft:  # mixup-like rows: a few classes with weight, the rest zero
        target = torch.softmax(3 * torch.randn(B, C, generator=gen), dim=-1)  # (B, C)
    else:
        target = torch.randint(0, C, (B,), generator=gen)  # (B,)
    return x.to(device), w.to(device), target.to(device)


def run(fn, x, w, target, scale, **kwargs):
    """Loss and the gradients to x, w and (a tensor) scale; None where no grad flows."""
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    leaves = [x, w]
    if isinstance(scale, torch.Tensor):
        scale = scale.detach().clone().requires_grad_()
        leaves.append(scale)
    loss = fn(x, w, target, scale, **kwargs)
    grads = torch.autograd.grad(loss, leaves)
    return [loss.detach(), *grads]


# B, C, D, soft, scale
CPU_CASES = [
    pytest.param(3, 5, 24, False, 7.5, id="odd-hard-float-scale"),
    pytest.param(3, 5, 24, True, "tensor", id="odd-soft-tensor-scale"),
    pytest.param(33, 70, 48, False, "tensor", id="hard-multi-tile-splits"),
    pytest.param(20, 37, 40, True, 100.0, id="soft-clip-temperature"),
    pytest.param(4, 1, 16, False, "tensor", id="one-class"),
]


@pytest.mark.parametrize("B, C, D, soft, scale", CPU_CASES)
def test_triton_matches_reference_fp32(B, C, D, soft, scale):
    x, w, target = make_inputs(B, C, D, soft)
    if scale == "tensor":
        scale = torch.tensor(12.5)
    got = run(cosine_cross_entropy, x, w, target, scale, impl="triton")
    want = run(cosine_cross_entropy_reference, x, w, target, scale)
    assert len(got) == len(want)
    for name, a, b in zip(NAMES, got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert relative_error(a, b) <= 1e-4, f"{name}: relative error {relative_error(a, b):.2e}"


def test_info_nce_both_views_trainable():
    """InfoNCE: w is the other view's embeddings, target = arange(B)."""
    a, b, _ = make_inputs(24, 24, 32, False)
    b = a + 0.5 * b  # correlated views
    target = torch.arange(24)
    got = run(cosine_cross_entropy, a, b, target, torch.tensor(1 / 0.07), impl="triton")
    want = run(cosine_cross_entropy_reference, a, b, target, torch.tensor(1 / 0.07))
    for name, g, r in zip(NAMES, got, want):
        assert relative_error(g, r) <= 1e-4, name


def test_frozen_classes_and_zero_row():
    """Frozen class features (w without grad: the classification loss on cached text
    features) and an all-zero row of x, where F.normalize's 1e-12 clamp decides the gradient."""
    x, w, target = make_inputs(9, 11, 20, False)
    x[4] = 0.0

    def go(fn, **kw):
        x_ = x.clone().requires_grad_()
        loss = fn(x_, w, target, 10.0, **kw)
        return loss, torch.autograd.grad(loss, x_)[0]

    (loss, dx), (loss_ref, dx_ref) = go(cosine_cross_entropy, impl="triton"), go(cosine_cross_entropy_reference)
    assert relative_error(loss.detach(), loss_ref.detach()) <= 1e-4
    assert relative_error(dx, dx_ref) <= 1e-4
    assert dx[4].abs().max() > 1e6  # the clamp's 1/eps slope, as in autograd


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_cpu(dtype):
    x, w, target = make_inputs(33, 70, 48, False)
    want = run(cosine_cross_entropy_reference, x, w, target, torch.tensor(30.0))
    got = run(cosine_cross_entropy, x.to(dtype), w.to(dtype), target, torch.tensor(30.0), impl="triton")
    eager = run(cosine_cross_entropy_reference, x.to(dtype), w.to(dtype), target, torch.tensor(30.0))
    for name, a, e, b in zip(NAMES, got, eager, want):
        assert a.dtype == e.dtype, name
        err, err_eager = (a.float() - b).abs().max().item(), (e.float() - b).abs().max().item()
        assert err <= 2 * err_eager + 1e-6, f"{name}: {dtype} error {err:.3e} > 2x eager {err_eager:.3e}"


def test_auto_is_the_reference_on_cpu():
    x, w, target = make_inputs(5, 7, 16, True)
    got = run(cosine_cross_entropy, x, w, target, torch.tensor(3.0), impl="auto")
    want = run(cosine_cross_entropy_reference, x, w, target, torch.tensor(3.0))
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(ce_module, "_INTERPRETED", False)
    x, w, target = make_inputs(2, 3, 16, False)
    with pytest.raises(FastpromptError, match="TRITON_INTERPRET=1"):
        cosine_cross_entropy(x, w, target, 1.0, impl="triton")


def test_soft_target_requiring_grad_is_refused_by_triton():
    x, w, target = make_inputs(2, 3, 16, True)
    with pytest.raises(FastpromptError, match="no gradient to target"):
        cosine_cross_entropy(x, w, target.requires_grad_(), 1.0, impl="triton")


def test_out_of_range_class_index_is_refused():
    x, w, _ = make_inputs(2, 3, 16, False)
    with pytest.raises(FastpromptError, match=r"\[0, 3\)"):
        cosine_cross_entropy(x, w, torch.tensor([0, 3]), 1.0, impl="triton")


@pytest.mark.parametrize(
    "x_shape, w_shape, target, scale, kwargs, match",
    [
        ((4, 8), (3, 9), "hard", 1.0, {}, "must share D"),
        ((4, 8, 1), (3, 8), "hard", 1.0, {}, "must be 2-D"),
        ((4, 8), (3, 8), torch.zeros(3, dtype=torch.int64), 1.0, {}, r"shape \(B,\) = \(4,\)"),
        ((4, 8), (3, 8), torch.zeros(4, 4), 1.0, {}, r"shape \(B, C\) = \(4, 3\)"),
        ((4, 8), (3, 8), torch.zeros(4, dtype=torch.int32), 1.0, {}, "int64 class indices"),
        ((4, 8), (3, 8), "hard", torch.ones(2), {}, "one-element float tensor"),
        ((4, 8), (3, 8), "hard", "10", {}, "python float or a tensor"),
        ((4, 8), (3, 8), "hard", 1.0, {"impl": "fast"}, "impl='fast' is not supported"),
        ((0, 8), (3, 8), torch.zeros(0, dtype=torch.int64), 1.0, {}, ">= 1"),
    ],
)
def test_bad_inputs_raise_fastprompt_error(x_shape, w_shape, target, scale, kwargs, match):
    x, w = torch.randn(x_shape), torch.randn(w_shape)
    if isinstance(target, str):
        target = torch.zeros(x_shape[0], dtype=torch.int64)
    with pytest.raises(FastpromptError, match=match):
        cosine_cross_entropy(x, w, target, scale, **kwargs)


def test_dtype_mismatch_raises_fastprompt_error():
    with pytest.raises(FastpromptError, match="share one dtype"):
        cosine_cross_entropy(torch.randn(2, 8), torch.randn(3, 8, dtype=torch.float16), torch.zeros(2, dtype=torch.int64), 1.0)


# ---------------------------------------------------------------------------------------
# GPU: real shapes, fp32 and low precision
# ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "B, C, D, soft",
    [
        pytest.param(256, 1000, 512, False, id="imagenet-hard"),
        pytest.param(256, 1000, 512, True, id="imagenet-soft"),
        pytest.param(256, 256, 512, False, id="infonce"),
        pytest.param(4096, 20000, 512, False, id="largest"),
        pytest.param(9, 41, 341, True, id="odd"),
    ],
)
def test_gpu_matches_reference(B, C, D, soft, dtype):
    x, w, target = make_inputs(B, C, D, soft, device="cuda")
    scale = torch.tensor(100.0, device="cuda")
    want = run(cosine_cross_entropy_reference, x, w, target, scale)  # fp32 oracle
    got = run(cosine_cross_entropy, x.to(dtype), w.to(dtype), target, scale, impl="triton")
    if dtype == torch.float32:
        for name, a, b in zip(NAMES, got, want):
            assert relative_error(a, b) <= 1e-4, f"{name}: relative error {relative_error(a, b):.2e}"
        return
    eager = run(cosine_cross_entropy_reference, x.to(dtype), w.to(dtype), target, scale)
    for name, a, e, b in zip(NAMES, got, eager, want):
        err, err_eager = (a.float() - b).abs().max().item(), (e.float() - b).abs().max().item()
        assert err <= 2 * err_eager + 1e-6, f"{name}: {dtype} error {err:.3e} > 2x eager {err_eager:.3e}"

