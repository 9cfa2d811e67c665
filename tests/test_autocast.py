"""The ops under ``torch.autocast`` (bf16 training with fp32 master weights): inputs are cast as F.linear and SDPA
cast them, the result is in the autocast dtype, and gradients reach the fp32 weights with their full shapes."""

import pytest
import torch

from flextron_kernels import elastic_attention, elastic_attention_decode, nested_mlp, sliced_linear
from flextron_kernels.reference import (
    elastic_attention_decode_ref,
    elastic_attention_ref,
    nested_mlp_ref,
    sliced_linear_ref,
)
from tests.utils import DEVICE, assert_close, randn

BF16 = torch.bfloat16


def _autocast():
    return torch.autocast(device_type=DEVICE, dtype=BF16)


def test_sliced_linear_autocast_casts_prefix_and_grads_reach_fp32_weights():
    x = randn(3, 5, 24, requires_grad=True)
    w = randn(40, 32, requires_grad=True)
    b = randn(40, requires_grad=True)
    with _autocast():
        y = sliced_linear(x, w, b, 17)
    assert y.dtype == BF16 and y.shape == (3, 5, 17)
    # Reference: the same bf16-rounded operands in float64.
    xr, wr, br = (t.detach().to(BF16).double().requires_grad_() for t in (x, w, b))
    ref = sliced_linear_ref(xr, wr, br, 17)
    assert_close(y, ref, BF16)
    g = randn(3, 5, 17)
    y.backward(g.to(BF16))
    ref.backward(g.double())
    assert w.grad.dtype == torch.float32 and w.grad.shape == w.shape
    assert (w.grad[17:] == 0).all() and (w.grad[:, 24:] == 0).all() and (b.grad[17:] == 0).all()
    assert_close(w.grad, wr.grad, BF16, "dW")
    assert_close(b.grad, br.grad, BF16, "db")
    assert_close(x.grad, xr.grad, BF16, "dx")


def test_nested_mlp_autocast_matches_bf16_reference_and_grads():
    x = randn(2, 9, 32, requires_grad=True)
    up, gate = randn(48, 32, scale=0.2, requires_grad=True), randn(48, 32, scale=0.2, requires_grad=True)
    down = randn(32, 48, scale=0.2, requires_grad=True)
    widths = torch.tensor([[5, 48, 17, 30, 1, 30, 9, 40, 12]] * 2, device=DEVICE)
    with _autocast():
        y = nested_mlp(x, up, down, widths, gate_weight=gate)
    assert y.dtype == BF16
    leaves = [t.detach().to(BF16).double().requires_grad_() for t in (x, up, down, gate)]
    ref = nested_mlp_ref(leaves[0], leaves[1], leaves[2], widths, gate_weight=leaves[3])
    assert_close(y, ref, BF16)
    g = randn(2, 9, 32)
    y.backward(g.to(BF16))
    ref.backward(g.double())
    for t, r, name in zip((x, up, down, gate), leaves, ("dx", "dWu", "dWd", "dWg")):
        assert t.grad.dtype == torch.float32 and t.grad.shape == t.shape
        assert_close(t.grad, r.grad, BF16, name)


def test_attention_autocast_casts_mixed_dtypes():
    q = randn(2, 4, 19, 16, dtype=torch.float32)
    k, v = randn(2, 2, 19, 16, dtype=BF16), randn(2, 2, 19, 16, dtype=BF16)
    heads = torch.tensor([2, 4], device=DEVICE)
    with _autocast():
        o = elastic_attention(q, k, v, heads)
    assert o.dtype == BF16
    ref = elastic_attention_ref(q.to(BF16).double(), k.double(), v.double(), heads, causal=True,
                                scale=16 ** -0.5)
    assert_close(o, ref, BF16)
    lens = torch.tensor([19, 7], device=DEVICE, dtype=torch.int32)
    with _autocast():
        od = elastic_attention_decode(q[:, :, 0], k, v, lens, heads)
    assert od.dtype == BF16
    refd = elastic_attention_decode_ref(q[:, :, 0].to(BF16).double(), k.double(), v.double(), lens, heads,
                                        scale=16 ** -0.5)
    assert_close(od, refd, BF16)


@pytest.mark.parametrize("op", ["sliced_linear", "nested_mlp"])
def test_dtype_mismatch_outside_autocast_still_raises(op):
    x = randn(4, 16, dtype=BF16)
    w = randn(8, 16)
    with pytest.raises(TypeError, match="weight"):
        if op == "sliced_linear":
            sliced_linear(x, w)
        else:
            nested_mlp(x, w, randn(16, 8), torch.full((4,), 8, device=DEVICE))
