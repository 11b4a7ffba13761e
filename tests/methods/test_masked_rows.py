"""Rows that must not count, as the sync-free step writes them (issue 15 §2): an all-zero
probability target adds exactly nothing to the fused cosine cross-entropy, loss or gradient,
on the Triton kernel (CPU interpreter here, the GPU path of CAVPT's gt-only term and E2MIM's
mixed rows) as on the reference; the masked InfoNCE equals the InfoNCE of the valid rows alone."""

import torch

from fastprompt.kernels import cosine_cross_entropy
from fastprompt.losses import info_nce

from _util import relative_error


def _grads(impl, x, w, target, scale):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = cosine_cross_entropy(x, w, target, scale, impl=impl)
    loss.backward()
    return loss.detach(), x.grad, w.grad


def test_zero_target_rows_add_nothing_on_the_kernel():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(9, 32, generator=g), torch.randn(5, 32, generator=g)  # (B, D), (C, D)
    labels = torch.randint(0, 5, (9,), generator=g)
    keep = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1], dtype=torch.bool)  # (B,)
    target = torch.nn.functional.one_hot(labels, 5).float() * keep[:, None]  # (B, C): zero rows where not kept
    for impl in ("triton", "reference"):
        loss, gx, gw = _grads(impl, x, w, target, 14.0)
        want, want_gx, want_gw = _grads("reference", x[keep], w, labels[keep], 14.0)
        assert relative_error(loss * (9 / 5), want) <= 1e-5, impl  # mean over 9 rows, rescaled to the 5 kept
        assert torch.count_nonzero(gx[~keep]) == 0, impl
        assert relative_error(gx[keep] * (9 / 5), want_gx) <= 1e-4, impl
        assert relative_error(gw * (9 / 5), want_gw) <= 1e-4, impl
    all_zero = _grads("triton", x, w, torch.zeros(9, 5), 14.0)
    assert all_zero[0].item() == 0.0 and torch.count_nonzero(all_zero[1]) == 0 and torch.count_nonzero(all_zero[2]) == 0


def test_masked_info_nce_is_the_info_nce_of_the_valid_rows():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)  # (M, e)
    valid = torch.tensor([1, 1, 1, 1, 0, 1, 0, 1], dtype=torch.bool)
    scale = torch.tensor(7.0)
    torch.testing.assert_close(info_nce(a, b, scale, "reference", valid), info_nce(a[valid], b[valid], scale, "reference"))
    torch.testing.assert_close(info_nce(a, b, scale, "fast", torch.ones(8, dtype=torch.bool)), info_nce(a, b, scale, "fast"))
    a.requires_grad_()
    info_nce(a, b, scale, "reference", valid).backward()
    assert torch.count_nonzero(a.grad[~valid]) == 0 and torch.isfinite(a.grad).all()
