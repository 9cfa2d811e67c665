"""elastic_attention's choice of implementation: SDPA on head-prefix views for uniform budgets, SDPA per budget
group for host lists, the Triton kernel for budget tensors and end-aligned chunks. Every backend against the float64
reference, forward and gradients; the rule itself; bad host lists."""

import pytest
import torch

from flextron_kernels import attention_backend, elastic_attention
from flextron_kernels.elastic_attention import sdpa_serves
from flextron_kernels.reference import elastic_attention_ref
from tests.utils import DEVICE, ON_GPU, assert_close, randn

GRAD_SCALE = 2.0


def _qkv(b, hq, hkv, sq, d, sk=None, dtype=torch.float32):
    sk = sq if sk is None else sk
    return (randn(b, hq, sq, d, dtype=dtype, requires_grad=True), randn(b, hkv, sk, d, dtype=dtype, requires_grad=True),
            randn(b, hkv, sk, d, dtype=dtype, requires_grad=True))


def _against_ref(q, k, v, num_heads, causal=True, dtype=torch.float32):
    o = elastic_attention(q, k, v, num_heads, causal=causal)
    do = randn(*o.shape, dtype=dtype)
    o.backward(do)
    assert o.shape == q.shape and o.dtype == dtype
    qr, kr, vr = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    heads = torch.tensor(num_heads) if isinstance(num_heads, list) else num_heads
    ref = elastic_attention_ref(qr, kr, vr, heads, causal=causal)
    ref.backward(do.double().cpu())
    assert_close(o.cpu(), ref, dtype, "o")
    for name, t, r in (("dq", q, qr), ("dk", k, kr), ("dv", v, vr)):
        assert_close(t.grad.cpu(), r.grad, dtype, name, GRAD_SCALE)
    return o


@pytest.mark.parametrize("backend", ["sdpa", "triton", "auto"])
@pytest.mark.parametrize("num_heads", [None, 6, 4, [6, 4, 4, 2], [2, 6, 2, 4]],
                         ids=["none", "int-full", "int-part", "list-adjacent", "list-scattered"])
@pytest.mark.parametrize("hkv", [6, 3], ids=["mha", "gqa"])
def test_every_backend_matches_reference(backend, num_heads, hkv):
    if hkv == 3 and isinstance(num_heads, list):
        num_heads = [h + h % 2 for h in num_heads]  # whole KV groups of 2
    q, k, v = _qkv(4, 6, hkv, 37, 16)
    with attention_backend(backend):
        o = _against_ref(q, k, v, num_heads)
    budgets = num_heads if isinstance(num_heads, list) else [num_heads or 6] * 4
    for b, h in enumerate(budgets):
        assert torch.count_nonzero(o[b, h:]) == 0, f"sequence {b}: heads past {h} must be zeros"


@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_on_views_and_one_query(causal):
    """Head-prefix views of a [B, S, H, D] projection as the model passes them, and a single query (decode)."""
    big = randn(2, 29, 8, 16, requires_grad=True)
    q = big.transpose(1, 2)[:, :4]
    kv = randn(2, 29, 2, 4, 16, requires_grad=True)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    for t in (q, k, v):
        t.retain_grad()
    with attention_backend("sdpa"):
        _against_ref(q, k, v, None, causal=causal)
        q1, k1, v1 = _qkv(3, 4, 2, 1, 16, sk=40)
        _against_ref(q1, k1, v1, [4, 2, 2], causal=True)  # one query sees every key: SDPA serves it


def test_end_aligned_chunk_runs_triton():
    """1 < Sq < Sk causal: SDPA's is_causal would align the queries to the first keys; the kernel serves it."""
    with attention_backend("sdpa"):
        for num_heads in (2, [4, 2]):
            q, k, v = _qkv(2, 4, 2, 9, 16, sk=30)
            assert not sdpa_serves(q, k, True) and sdpa_serves(q, k, False)
            _against_ref(q, k, v, num_heads)


def test_rule():
    q, k, _ = _qkv(1, 4, 4, 8, 16)
    with attention_backend("triton"):
        assert not sdpa_serves(q, k, True)
    with attention_backend("sdpa"):
        assert sdpa_serves(q, k, True)
    assert sdpa_serves(q, k, True) == (ON_GPU and DEVICE == "cuda")  # auto: SDPA on a GPU only


def test_host_list_rule():
    """Under "auto", mixed host-list budgets take the Triton kernel for a prompt outside autograd; one budget for
    all, a single query, a call that records autograd, or another backend keep SDPA per group."""
    from flextron_kernels.elastic_attention import _kernel_takes_list

    q, k, v = _qkv(2, 4, 2, 8, 16)
    q1 = q[:, :, :1]
    with torch.no_grad():
        assert _kernel_takes_list([4, 2], q, k, v)
        assert not _kernel_takes_list([4, 4], q, k, v)
        assert not _kernel_takes_list([4, 2], q1, k, v)
        with attention_backend("sdpa"):
            assert not _kernel_takes_list([4, 2], q, k, v)
    assert not _kernel_takes_list([4, 2], q, k, v)  # q requires grad
    with torch.no_grad():
        assert _kernel_takes_list([4, 2], q.detach(), k.detach(), v.detach())


@pytest.mark.skipif(not ON_GPU, reason="under 'auto' SDPA serves lists on a GPU only")
def test_host_list_prompt_runs_the_kernel_on_a_gpu(monkeypatch):
    """A mixed host list on a prompt, outside autograd: one Triton launch (no SDPA call), the reference's output;
    with autograd, SDPA per group."""
    import importlib

    ea = importlib.import_module("flextron_kernels.elastic_attention")
    calls = {"kernel": 0, "sdpa": 0}
    real_forward, real_sdpa = ea.forward, ea.F.scaled_dot_product_attention
    monkeypatch.setattr(ea, "forward", lambda *a: calls.__setitem__("kernel", calls["kernel"] + 1) or real_forward(*a))
    monkeypatch.setattr(ea.F, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.__setitem__("sdpa", calls["sdpa"] + 1) or real_sdpa(*a, **kw))
    q, k, v = _qkv(4, 8, 4, 64, 64, dtype=torch.bfloat16)
    budgets = [2, 8, 4, 8]
    with torch.no_grad():
        o = elastic_attention(q, k, v, budgets)
    assert calls == {"kernel": 1, "sdpa": 0}
    ref = elastic_attention_ref(*(t.detach().double().cpu() for t in (q, k, v)), torch.tensor(budgets))
    assert_close(o.cpu(), ref, torch.bfloat16, "o")
    _against_ref(q, k, v, budgets, dtype=torch.bfloat16)
    assert calls["sdpa"] > 0


def test_bad_backend_and_lists():
    q, k, v = _qkv(2, 4, 2, 8, 16)
    with pytest.raises(ValueError, match="backend"), attention_backend("flash"):
        pass
    for backend in ("sdpa", "triton"):
        with attention_backend(backend):
            with pytest.raises(ValueError, match="one count per sequence"):
                elastic_attention(q, k, v, [4])
            with pytest.raises(ValueError, match=r"num_heads\[1\]"):
                elastic_attention(q, k, v, [4, 3])  # not a whole KV group
            with pytest.raises(ValueError, match=r"num_heads\[0\]"):
                elastic_attention(q, k, v, [6, 4])
            with pytest.raises(TypeError, match=r"num_heads\[0\]"):
                elastic_attention(q, k, v, [4.0, 4])
