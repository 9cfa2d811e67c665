"""``distill_cross_entropy`` against the float64 definition: loss and gradient, with and without a teacher, at
several temperatures and weights, vocabularies spanning several blocks, strided logits; bad input."""

from __future__ import annotations

import pytest
import torch

import flextron_kernels._runtime
from flextron_kernels import distill_cross_entropy
from flextron_kernels.reference import distill_cross_entropy_ref
from tests.utils import DEVICE, DTYPES, poisoned_allocations

TOL = {torch.float32: (1e-5, 1e-6), torch.float16: (2e-3, 1e-4), torch.bfloat16: (1e-2, 1e-3)}


def _by_hand(z, target, teacher, alpha, temperature):
    """float64, written out: -log p(target) and sum_v p_t (log p_t - log q), p = softmax(z), q = softmax(z / T)."""
    z, v = z.double(), z.shape[-1]
    z2 = z.reshape(-1, v)
    ce = (torch.logsumexp(z2, -1) - z2.gather(1, target.reshape(-1, 1)).squeeze(1)).mean()
    if teacher is None or alpha == 0:
        return ce
    lq = z2 / temperature - torch.logsumexp(z2 / temperature, -1, keepdim=True)
    t2 = teacher.double().reshape(-1, v) / temperature
    lpt = t2 - torch.logsumexp(t2, -1, keepdim=True)
    kl = (lpt.exp() * (lpt - lq)).sum(-1).mean()
    return (1 - alpha) * ce + alpha * temperature**2 * kl


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha,temperature,with_teacher,vocab", [
    (0.5, 1.0, True, 203), (0.3, 2.0, True, 203), (1.0, 1.0, True, 127), (0.0, 1.0, True, 203),
    (0.5, 1.0, False, 1000), (0.7, 0.5, True, 1000), (0.5, 1.0, True, 1)])
def test_against_float64(dtype, alpha, temperature, with_teacher, vocab):
    """Vocabularies of one entry, under one block, and of several blocks with a ragged last one; every gradient
    element written (allocations poisoned with NaN)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    z = (4 * torch.randn(3, 7, vocab, generator=g)).to(DEVICE, dtype).requires_grad_(True)
    teacher = (4 * torch.randn(3, 7, vocab, generator=g)).to(DEVICE, dtype) if with_teacher else None
    target = torch.randint(0, vocab, (3, 7), generator=g).to(DEVICE)
    with poisoned_allocations():
        loss = distill_cross_entropy(z, target, teacher, alpha, temperature)
    assert loss.dtype == torch.float32 and loss.shape == ()
    zd = z.detach().double().requires_grad_(True)
    ref = _by_hand(zd, target, teacher, alpha, temperature)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(loss.double(), ref, rtol=rtol, atol=atol)
    (2.5 * loss).backward()  # an upstream gradient other than 1
    assert torch.isfinite(z.grad).all()
    (gref,) = torch.autograd.grad(2.5 * ref, zd)
    assert z.grad.dtype == dtype
    torch.testing.assert_close(z.grad.double(), gref, rtol=rtol, atol=atol * 0.1 + 2 * rtol * gref.abs().max())
    # the plain-torch reference (the CPU path) agrees with the hand-written definition
    torch.testing.assert_close(distill_cross_entropy_ref(zd.detach(), target, teacher, alpha, temperature),
                               ref.detach(), rtol=1e-10, atol=1e-12)


def test_backward_scales_the_stored_gradient_once():
    """The backward hands on its stored gradient scaled in place (no second logits-sized buffer): the upstream
    scale reaches the logits once, and a second backward through the same graph is refused by name instead of
    returning a gradient scaled twice."""
    g = torch.Generator(device="cpu").manual_seed(2)
    z = (3 * torch.randn(5, 97, generator=g)).to(DEVICE).requires_grad_(True)
    teacher = (3 * torch.randn(5, 97, generator=g)).to(DEVICE)
    target = torch.randint(0, 97, (5,), generator=g).to(DEVICE)
    loss = distill_cross_entropy(z, target, teacher, 0.5, 2.0)
    (3.0 * loss).backward(retain_graph=True)
    zd = z.detach().double().requires_grad_(True)
    (gref,) = torch.autograd.grad(3.0 * _by_hand(zd, target, teacher, 0.5, 2.0), zd)
    torch.testing.assert_close(z.grad.double(), gref, rtol=1e-5, atol=1e-7)
    with pytest.raises(RuntimeError, match="distill_cross_entropy: a second backward"):
        loss.backward()
    # a fresh loss on the same logits is independent of the spent one
    z.grad = None
    distill_cross_entropy(z, target, teacher, 0.5, 2.0).backward()
    torch.testing.assert_close(z.grad.double(), gref / 3.0, rtol=1e-5, atol=1e-7)


def test_strided_logits_and_no_grad():
    """Logits of all but the last position (a strided view, as a language model's shifted outputs are), strided
    targets, and a call under ``no_grad`` (the loss alone)."""
    g = torch.Generator(device="cpu").manual_seed(1)
    full = (3 * torch.randn(2, 9, 130, generator=g)).to(DEVICE).requires_grad_(True)
    teacher = (3 * torch.randn(2, 9, 130, generator=g)).to(DEVICE)
    z, t = full[:, :-1], teacher[:, :-1]
    target = torch.randint(0, 130, (2, 16), generator=g).to(DEVICE)[:, ::2]  # strided targets too
    loss = distill_cross_entropy(z, target, t, 0.5, 1.0)
    loss.backward()
    zd = z.detach().double().requires_grad_(True)
    ref = _by_hand(zd, target, t, 0.5, 1.0)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    (gref,) = torch.autograd.grad(ref, zd)
    torch.testing.assert_close(full.grad[:, :-1].double(), gref, rtol=1e-4, atol=1e-7)
    assert torch.count_nonzero(full.grad[:, -1]) == 0
    with torch.no_grad():
        torch.testing.assert_close(distill_cross_entropy(z, target, t).double(), ref.detach(), rtol=1e-5, atol=1e-6)
        # 1-D logits rows with a strided 1-D target (reshape keeps the view)
        z1, t1 = full.detach()[0], teacher[0]
        tgt1 = torch.randint(0, 130, (18,), generator=g).to(DEVICE)[::2]
        torch.testing.assert_close(distill_cross_entropy(z1, tgt1, t1).double(), _by_hand(z1, tgt1, t1, 0.5, 1.0),
                                   rtol=1e-5, atol=1e-6)


def test_target_outside_the_vocabulary_gives_nan():
    """Targets are not checked (a device sync); on the kernel's path an out-of-range id makes the loss NaN instead of
    reading another row's logits."""
    if DEVICE == "cpu" and not flextron_kernels._runtime.INTERPRET:
        pytest.skip("the reference raises on the CPU")
    z = torch.zeros(2, 3, 11, device=DEVICE)
    for bad in (11, -1):
        tgt = torch.zeros(2, 3, dtype=torch.long, device=DEVICE)
        tgt[1, 2] = bad
        assert torch.isnan(distill_cross_entropy(z, tgt))


def test_bad_input():
    z = torch.zeros(2, 5, 11, device=DEVICE)
    tgt = torch.zeros(2, 5, dtype=torch.long, device=DEVICE)
    with pytest.raises(TypeError, match="target must have an integer dtype"):
        distill_cross_entropy(z, tgt.float())
    with pytest.raises(ValueError, match=r"target must have shape logits.shape\[:-1\]"):
        distill_cross_entropy(z, tgt[:, :4])
    with pytest.raises(ValueError, match="teacher must have logits' shape"):
        distill_cross_entropy(z, tgt, z[:, :4])
    with pytest.raises(ValueError, match="alpha must be in"):
        distill_cross_entropy(z, tgt, z, alpha=1.5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        distill_cross_entropy(z, tgt, z, temperature=0.0)
    with pytest.raises(TypeError, match="logits must be float32, float16 or bfloat16"):
        distill_cross_entropy(tgt, tgt[:, 0])
    with pytest.raises(TypeError, match="target must be an integer torch.Tensor"):
        distill_cross_entropy(z, [0, 1])
