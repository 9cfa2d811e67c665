"""elastic_attention and its decode form against the float64 reference: lengths off every block multiple,
per-sequence head budgets, causal and not, GQA and MHA, every dtype, gradients, strided views, bad input."""

import contextlib
import importlib

import pytest
import torch

from flextron_kernels import attention_backend, elastic_attention, elastic_attention_decode
from flextron_kernels.reference import elastic_attention_decode_ref, elastic_attention_ref
from tests.utils import DEVICE, DTYPES, ON_GPU, assert_close, poisoned_allocations, randn

# Attention gradients go through a softmax and two more products: allow a little more than a plain matmul.
GRAD_SCALE = 2.0


def _qkv(b, hq, hkv, sq, d, dtype, sk=None, requires_grad=True):
    sk = sq if sk is None else sk
    return (randn(b, hq, sq, d, dtype=dtype, requires_grad=requires_grad),
            randn(b, hkv, sk, d, dtype=dtype, requires_grad=requires_grad),
            randn(b, hkv, sk, d, dtype=dtype, requires_grad=requires_grad))


def _check_fwd_bwd(q, k, v, num_heads, causal, dtype, scale=None):
    with poisoned_allocations():
        o = elastic_attention(q, k, v, num_heads, causal=causal, scale=scale)
        do = randn(*o.shape, dtype=dtype)
        o.backward(do)
    assert o.shape == q.shape and o.dtype == dtype
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    heads = num_heads.cpu() if isinstance(num_heads, torch.Tensor) else num_heads
    ref = elastic_attention_ref(qr, kr, vr, heads, causal=causal, scale=scale)
    ref.backward(do.double())
    assert_close(o, ref, dtype, "o")
    assert_close(q.grad, qr.grad, dtype, "dq", GRAD_SCALE)
    assert_close(k.grad, kr.grad, dtype, "dk", GRAD_SCALE)
    assert_close(v.grad, vr.grad, dtype, "dv", GRAD_SCALE)
    return o


@pytest.mark.parametrize("seq", [1, 67, 130])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hkv", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_backward(seq, causal, hkv, dtype):
    q, k, v = _qkv(2, 4, hkv, seq, 32, dtype)
    heads = torch.tensor([4, 2], device=DEVICE)  # per-sequence budgets, both multiples of the group size
    o = _check_fwd_bwd(q, k, v, heads, causal, dtype)
    # Past the budget: exact zeros in the output and in every gradient that only those heads could reach.
    assert torch.count_nonzero(o[1, 2:]) == 0
    assert torch.count_nonzero(q.grad[1, 2:]) == 0
    if hkv == 4:
        assert torch.count_nonzero(k.grad[1, 2:]) == 0 and torch.count_nonzero(v.grad[1, 2:]) == 0


@pytest.mark.parametrize("d", [16, 64, 128])
def test_head_dims(d):
    q, k, v = _qkv(1, 2, 1, 45, d, torch.float16)
    _check_fwd_bwd(q, k, v, 2, True, torch.float16)


@pytest.mark.parametrize("num_heads", [None, 6, 4], ids=["none", "int-full", "int-part"])
def test_num_heads_forms(num_heads):
    q, k, v = _qkv(2, 6, 3, 33, 16, torch.float32)
    _check_fwd_bwd(q, k, v, num_heads, True, torch.float32)


def test_longer_keys_and_scale():
    """Sq < Sk (a chunk of new queries after a cached prefix): causal aligns the queries to the last keys."""
    q, k, v = _qkv(2, 4, 2, 20, 32, torch.float32, sk=90)
    _check_fwd_bwd(q, k, v, torch.tensor([2, 4], device=DEVICE), True, torch.float32, scale=0.3)


def test_noncontiguous_views():
    """A head-prefix view of a wider q and [B, S, H, D] tensors transposed: read through strides, no copy."""
    qbig = randn(2, 50, 6, 32, requires_grad=True)
    q = qbig.transpose(1, 2)[:, :4]  # [2, 4, 50, 32], strides of a [B, S, H, D] layout
    kv = randn(2, 50, 2, 2, 32, requires_grad=True)
    k, v = kv[:, :, :, 0].transpose(1, 2), kv[:, :, :, 1].transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    heads = torch.tensor([4, 2], device=DEVICE)
    o = elastic_attention(q, k, v, heads)
    do = randn(*o.shape)
    o.backward(do)
    qr, kvr = qbig.detach().double().requires_grad_(), kv.detach().double().requires_grad_()
    kr, vr = kvr[:, :, :, 0].transpose(1, 2), kvr[:, :, :, 1].transpose(1, 2)
    ref = elastic_attention_ref(qr.transpose(1, 2)[:, :4], kr, vr, heads.cpu())
    ref.backward(do.double())
    assert_close(o, ref, torch.float32, "o")
    assert_close(qbig.grad, qr.grad, torch.float32, "dq", GRAD_SCALE)
    assert_close(kv.grad, kvr.grad, torch.float32, "dkv", GRAD_SCALE)
    assert torch.count_nonzero(qbig.grad[:, :, 4:]) == 0


def test_inactive_heads_skip_nan_inputs():
    """Heads past the budget are never read: NaN there must not leak into the output or gradients."""
    q, k, v = _qkv(2, 4, 2, 40, 16, torch.float32, requires_grad=False)
    q[1, 2:] = float("nan")
    k[1, 1:] = float("nan")
    v[1, 1:] = float("nan")
    for t in (q, k, v):
        t.requires_grad_()
    heads = torch.tensor([4, 2], device=DEVICE)
    o = elastic_attention(q, k, v, heads)
    o.backward(torch.ones_like(o))
    assert torch.isfinite(o).all() and torch.count_nonzero(o[1, 2:]) == 0
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


# ------------------------------------------------------------------------------ the TMA forward (opt-in)
_EA = importlib.import_module("flextron_kernels.elastic_attention")


class _Forbidden:
    """Stands in for the pointer forward kernel: any launch of it fails the test."""

    def __getitem__(self, grid):
        raise AssertionError("the pointer forward kernel ran where the TMA forward should have")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["gqa-causal", "mha-full-keys", "chunk-after-cache", "views"])
def test_tma_forward(dtype, case, monkeypatch):
    """``attention_backend("triton_tma")``: the forward through 4-D TMA descriptors, with the pointer kernel's
    backward reading its log-sum-exp: outputs and gradients against the float64 reference, budgets' zeros exact."""
    if not _EA.tma_sms(torch.device(DEVICE)):
        pytest.skip("no TMA on this device (Hopper or later, or the interpreter)")
    monkeypatch.setattr(_EA, "_attn_fwd_kernel", _Forbidden())
    heads = torch.tensor([4, 2], device=DEVICE)
    with attention_backend("triton_tma"):
        if case == "views":  # a head prefix of [B, S, H, D] projections, transposed: strided, 16-byte aligned
            qbig = randn(2, 50, 6, 32, dtype=dtype)
            kv = randn(2, 50, 2, 2, 32, dtype=dtype)
            q = qbig.transpose(1, 2)[:, :4].requires_grad_()
            k, v = (kv[:, :, :, i].transpose(1, 2).requires_grad_() for i in (0, 1))
            q.retain_grad()
            o = _check_fwd_bwd(q, k, v, heads, True, dtype)
        else:
            seq, hkv, d, causal, sk = {"gqa-causal": (67, 2, 32, True, None),
                                       "mha-full-keys": (130, 4, 64, False, None),
                                       "chunk-after-cache": (20, 2, 32, True, 90)}[case]
            q, k, v = _qkv(2, 4, hkv, seq, d, dtype, sk=sk)
            o = _check_fwd_bwd(q, k, v, heads, causal, dtype)
    assert torch.count_nonzero(o[1, 2:]) == 0


@contextlib.contextmanager
def _only_config(kernel, config):
    """Within the block the autotuned ``kernel`` runs ``config`` and nothing else (its tuning cache set aside)."""
    saved = kernel.configs, kernel.cache
    kernel.configs, kernel.cache = [config], {}
    try:
        yield
    finally:
        kernel.configs, kernel.cache = saved


@pytest.mark.skipif(not ON_GPU, reason="the GPU's tiles: the interpreter has one config per kernel")
@pytest.mark.parametrize("kernel", ["_attn_fwd_kernel", "_attn_fwd_tma_kernel", "_attn_bwd_dq_kernel",
                                    "_attn_bwd_dkv_kernel"])
def test_every_tile(kernel):
    """Each config of each autotuned kernel, forced in turn, against the float64 reference: the autotuner keeps
    whichever tile is fastest on a machine, so any of them may serve a user. bf16 at D = 128 (the shapes the Hopper
    tiles are pruned to), queries after cached keys, lengths off every tile multiple, mixed budgets."""
    kern = getattr(_EA, kernel)
    backend = "triton_tma" if kernel == "_attn_fwd_tma_kernel" else "triton"
    if backend == "triton_tma" and not _EA.tma_sms(torch.device(DEVICE)):
        pytest.skip("no TMA on this device (Hopper or later)")
    heads = torch.tensor([4, 2], device=DEVICE)
    configs = list(kern.configs)
    assert len(configs) > 1
    for config in configs:
        q, k, v = _qkv(2, 4, 2, 200, 128, torch.bfloat16, sk=333)
        with _only_config(kern, config), attention_backend(backend):
            try:
                o = _check_fwd_bwd(q, k, v, heads, True, torch.bfloat16)
            except AssertionError as e:
                raise AssertionError(f"{kernel} with {config}: {e}") from None
        assert torch.count_nonzero(o[1, 2:]) == 0


class _Launches:
    """Stands in for a forward kernel: records its launches, computes nothing."""

    def __init__(self, name, seen):
        self.name, self.seen = name, seen

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.seen.append(self.name)


@pytest.mark.parametrize("interpret", [False, True], ids=["gpu", "interpreter"])
def test_forward_dispatch_between_tma_and_pointer_kernels(interpret, monkeypatch):
    """The default on a GPU is the TMA forward wherever its descriptors can read the operands, the pointer kernel
    elsewhere; under the interpreter the default is the pointer kernel; each backend name forces its forward."""
    seen = []
    monkeypatch.setattr(_EA, "_attn_fwd_kernel", _Launches("pointer", seen))
    monkeypatch.setattr(_EA, "_attn_fwd_tma_kernel", _Launches("tma", seen))
    monkeypatch.setattr(_EA, "INTERPRET", interpret)
    monkeypatch.setattr(_EA, "_tma_serves", lambda q, k, v: q.dtype != torch.float32)
    heads = torch.tensor([2, 4])
    q16, k16 = torch.zeros(2, 4, 8, 16, dtype=torch.float16), torch.zeros(2, 2, 8, 16, dtype=torch.float16)
    q32, k32 = q16.float(), k16.float()
    for backend, want16, want32 in [("auto", "pointer" if interpret else "tma", "pointer"),
                                    ("triton", "pointer", "pointer"), ("triton_tma", "tma", "pointer")]:
        seen.clear()
        with attention_backend(backend):
            _EA.forward(q16, k16, k16, heads, True, 0.25)
            _EA.forward(q32, k32, k32, heads, True, 0.25)
        assert seen == [want16, want32], backend


def test_tma_forward_falls_back_where_descriptors_cannot_read():
    """Operands TMA cannot describe (fp32; a base off 16 bytes) run the pointer kernel, with the same results."""
    if not _EA.tma_sms(torch.device(DEVICE)):
        pytest.skip("no TMA on this device (Hopper or later, or the interpreter)")
    q, k, v = _qkv(2, 4, 2, 33, 16, torch.float32)
    assert not _EA._tma_serves(q, k, v)
    with attention_backend("triton_tma"):
        _check_fwd_bwd(q, k, v, torch.tensor([2, 4], device=DEVICE), True, torch.float32)
    big = randn(2, 4, 33, 17, dtype=torch.float16)
    q16 = big[..., 1:].requires_grad_()  # base 2 bytes past an aligned one
    k16, v16 = (randn(2, 2, 33, 16, dtype=torch.float16, requires_grad=True) for _ in range(2))
    assert not _EA._tma_serves(q16, k16, v16)
    with attention_backend("triton_tma"):
        _check_fwd_bwd(q16, k16, v16, None, True, torch.float16)


# ---------------------------------------------------------------------------------------------- decode


def _decode_ref(q, kc, vc, lens, heads, scale=None):
    h = heads.cpu() if isinstance(heads, torch.Tensor) else heads
    q, kc, vc = (t.double().cpu() for t in (q, kc, vc))
    return elastic_attention_decode_ref(q, kc, vc, lens.cpu(), h, scale=scale)


@pytest.mark.parametrize("hkv", [8, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode(hkv, dtype):
    b, hq, s_max, d = 4, 8, 200, 32
    q = randn(b, hq, d, dtype=dtype)
    kc, vc = randn(b, hkv, s_max, d, dtype=dtype), randn(b, hkv, s_max, d, dtype=dtype)
    lens = torch.tensor([1, 77, 200, 130], device=DEVICE)
    heads = torch.tensor([8, 4, 2, 8], device=DEVICE) if hkv == 2 else torch.tensor([8, 5, 1, 8], device=DEVICE)
    if hkv == 2:
        heads = torch.tensor([8, 4, 4, 8], device=DEVICE)
    with poisoned_allocations():
        o = elastic_attention_decode(q, kc, vc, lens, heads)
    assert o.shape == (b, hq, d) and o.dtype == dtype
    assert_close(o, _decode_ref(q, kc, vc, lens, heads), dtype)
    assert torch.count_nonzero(o[2, heads[2]:]) == 0


def test_decode_chunk_policy():
    """Another chunking (a benchmark sweep's) changes the split count, never the result; the default comes back."""
    import sys

    from flextron_kernels import elastic_attention_decode as dec_mod

    dec = sys.modules["flextron_kernels.elastic_attention_decode"]
    # On a GPU a short cache is one chunk per SM under any policy (~130 SMs): a longer one there.
    b, hq, hkv, s_max, d = 2, 4, 2, 3000 if DEVICE == "cpu" else 16384, 32
    q, kc, vc = randn(b, hq, d), randn(b, hkv, s_max, d), randn(b, hkv, s_max, d)
    lens = torch.tensor([s_max, 1234], device=DEVICE)
    want = _decode_ref(q, kc, vc, lens, hq)
    default = dec.chunking(b, hkv, s_max, q.device)
    # Which policy changes the chunking depends on the device's SM count: take the first that does.
    candidates = [dec.ChunkPolicy(programs_per_sm=1, min_chunk=32), dec.ChunkPolicy(programs_per_sm=8, min_chunk=64),
                  dec.ChunkPolicy(programs_per_sm=64, min_chunk=16)]
    policy = None
    for c in candidates:
        with dec.chunk_policy(c):
            if dec.chunking(b, hkv, s_max, q.device) != default:
                policy = c
                break
    assert policy is not None, "no candidate policy changes the chunking: chunk_policy has no effect"
    with dec.chunk_policy(policy):
        assert_close(dec_mod(q, kc, vc, lens, hq), want, torch.float32)
    assert dec.chunking(b, hkv, s_max, q.device) == default
    with pytest.raises(TypeError, match="policy must be a ChunkPolicy"):
        with dec.chunk_policy((1, 32)):
            pass


@pytest.mark.parametrize("one_chunk", [True, False], ids=["one_chunk", "chunks"])
def test_decode_one_launch_and_two(one_chunk, monkeypatch):
    """A cache cut into one chunk is finished by the split kernel alone (normalised, zeros written: one launch);
    several chunks go through the reduce kernel. Both against the reference, with a budget that ends inside a KV
    group, one of none, one past Hq, an empty cache (unvalidated), and outputs allocated full of NaN."""
    import sys

    dec = sys.modules["flextron_kernels.elastic_attention_decode"]
    b, hq, hkv, d = 4, 8, 2, 32
    s_max, policy = (100, dec.ChunkPolicy(programs_per_sm=1, min_chunk=4096)) if one_chunk else \
        (1000, dec.ChunkPolicy(programs_per_sm=64, min_chunk=16))
    q, kc, vc = randn(b, hq, d), randn(b, hkv, s_max, d), randn(b, hkv, s_max, d)
    lens = torch.tensor([1, s_max - 23, s_max, 0], device=DEVICE)
    heads = torch.tensor([8, 3, 0, 9], device=DEVICE)
    reduce_launch, reduces = dec._REDUCE, []

    def counted(grid, tensors, scalars, constexprs):
        reduces.append(grid)
        reduce_launch(grid, tensors, scalars, constexprs)

    monkeypatch.setattr(dec, "_REDUCE", counted)
    with dec.chunk_policy(policy):
        assert (dec.chunking(b, hkv, s_max, q.device)[1] == 1) == one_chunk
        with poisoned_allocations():
            o = elastic_attention_decode(q, kc, vc, lens, heads, validate=False)
    want = _decode_ref(q, kc, vc, lens.clamp(min=1), torch.tensor([8, 3, 0, 8]))
    want[3] = 0  # an empty cache: zeros
    assert_close(o, want, torch.float32)
    assert len(reduces) == (0 if one_chunk else 1)
    assert torch.count_nonzero(o[1, 3:]) == 0 and torch.count_nonzero(o[2]) == 0 and torch.count_nonzero(o[3]) == 0


def test_decode_strided_cache_and_int_heads():
    """A [B, S_max, Hkv, D] cache transposed, garbage past each length, an int budget, a custom scale."""
    b, hq, hkv, s_max, d = 3, 4, 2, 96, 64
    cache = randn(b, s_max, 2, hkv, d)
    kc, vc = cache[:, :, 0].transpose(1, 2), cache[:, :, 1].transpose(1, 2)
    lens = torch.tensor([96, 5, 40], device=DEVICE)
    kc[1, :, 5:] = float("nan")  # past the cached prefix: must never be read into the result
    q = randn(b, hq, d)
    o = elastic_attention_decode(q, kc, vc, lens, 2, scale=0.2)
    assert_close(o, _decode_ref(q, kc.nan_to_num(), vc, lens, 2, scale=0.2), torch.float32)


def test_decode_matches_prefill_last_row():
    """Decoding the last token equals the last row of causal prefill over the same keys."""
    q, k, v = _qkv(2, 4, 2, 70, 32, torch.float32, requires_grad=False)
    heads = torch.tensor([2, 4], device=DEVICE)
    full = elastic_attention(q, k, v, heads)
    lens = torch.tensor([70, 70], device=DEVICE)
    assert_close(elastic_attention_decode(q[:, :, -1], k, v, lens, heads), full[:, :, -1].double(), torch.float32)


# ---------------------------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("frozen", [False, True])  # every input needs a gradient, or only q
def test_torch_compile_fullgraph(frozen):
    """Prefill and decode under torch.compile (fullgraph: no graph break; validate left on, skipped while tracing):
    each call one custom op, the prefill's backward registered. Outputs and gradients equal the eager ops' exactly
    (the same kernels)."""
    torch._dynamo.reset()
    q, k, v = _qkv(2, 4, 2, 70, 32, torch.float32, requires_grad=True)
    if frozen:
        k.requires_grad_(False)
        v.requires_grad_(False)
    leaves = [t for t in (q, k, v) if t.requires_grad]
    heads = torch.tensor([2, 4], device=DEVICE)
    lens = torch.tensor([70, 31], device=DEVICE)
    do = torch.randn_like(q)

    def step(q, k, v, heads, lens):
        return elastic_attention(q, k, v, heads), elastic_attention_decode(q[:, :, -1].detach(), k, v, lens, heads)
    o_eager, d_eager = step(q, k, v, heads, lens)
    g_eager = torch.autograd.grad(o_eager, leaves, do)
    o, d = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, heads, lens)
    grads = torch.autograd.grad(o, leaves, do)
    assert torch.equal(o, o_eager) and torch.equal(d, d_eager)
    assert all(torch.equal(a, b) for a, b in zip(grads, g_eager))


def test_custom_ops_opcheck():
    """torch.library.opcheck of the prefill's forward and backward custom ops and the decode op (schema, autograd
    registration, fake tensors, eager against AOT-dispatch tracing with dynamic shapes). The forward's log-sum-exp is
    scratch in heads past a budget (never read, unwritten): the eager-against-traced comparison runs with every
    head kept."""
    q, k, v = _qkv(2, 4, 2, 70, 32, torch.float32, requires_grad=True)
    heads = torch.tensor([2, 4], device=DEVICE, dtype=torch.int32)
    op_fwd = torch.ops.flextron.elastic_attention_fwd.default
    torch.library.opcheck(op_fwd, (q, k, v, heads, True, 0.2),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(op_fwd, (q, k, v, torch.full_like(heads, 4), True, 0.2))
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    o, lse = torch.ops.flextron.elastic_attention_fwd(qd, kd, vd, heads, True, 0.2)
    torch.library.opcheck(torch.ops.flextron.elastic_attention_bwd.default,
                          (torch.randn_like(o), qd, kd, vd, o, lse, heads, True, 0.2))
    lens = torch.tensor([70, 31], device=DEVICE, dtype=torch.int32)
    torch.library.opcheck(torch.ops.flextron.elastic_attention_decode_fwd.default,
                          (qd[:, :, -1], kd, vd, lens, heads, 0.2))


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_num_heads_zero():
    with pytest.raises(ValueError, match="num_heads"):
        elastic_attention(*_qkv(1, 4, 2, 8, 16, torch.float32), 0)


def test_bad_num_heads_above_hq():
    with pytest.raises(ValueError, match="num_heads"):
        elastic_attention(*_qkv(2, 4, 2, 8, 16, torch.float32), torch.tensor([4, 6], device=DEVICE))


def test_bad_num_heads_not_group_multiple():
    with pytest.raises(ValueError, match=r"num_heads .*multiple of 2"):
        elastic_attention(*_qkv(1, 4, 2, 8, 16, torch.float32), 3)


def test_bad_num_heads_shape():
    with pytest.raises(ValueError, match=r"num_heads must have shape \(2,\)"):
        elastic_attention(*_qkv(2, 4, 2, 8, 16, torch.float32), torch.tensor([4], device=DEVICE))


def test_bad_num_heads_type():
    with pytest.raises(TypeError, match="num_heads"):
        elastic_attention(*_qkv(1, 4, 2, 8, 16, torch.float32), 2.0)


def test_bad_hq_not_multiple_of_hkv():
    with pytest.raises(ValueError, match="multiple of k's Hkv=3"):
        elastic_attention(*_qkv(1, 4, 3, 8, 16, torch.float32))


def test_bad_kv_shape_mismatch():
    q, k, _ = _qkv(1, 4, 2, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="v must have k's shape"):
        elastic_attention(q, k, randn(1, 2, 9, 16))


def test_bad_q_k_head_dim_mismatch():
    q, _, v = _qkv(1, 4, 2, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="k must be"):
        elastic_attention(q, randn(1, 2, 8, 32), v)


def test_bad_dtype_mismatch():
    q, k, v = _qkv(1, 4, 2, 8, 16, torch.float32)
    with pytest.raises(TypeError, match="k must have q's dtype"):
        elastic_attention(q, k.half(), v)


def test_bad_integer_dtype():
    _, k, v = _qkv(1, 4, 2, 8, 16, torch.float32)
    with pytest.raises(TypeError, match="q must be float32"):
        elastic_attention(torch.ones(1, 4, 8, 16, dtype=torch.int32, device=DEVICE), k, v)


def test_bad_head_dim():
    with pytest.raises(ValueError, match="head dim must be a power of two"):
        elastic_attention(*_qkv(1, 4, 2, 8, 24, torch.float32))


@pytest.mark.parametrize("scale, error", [(0.0, ValueError), (-0.1, ValueError), (True, TypeError), ("1", TypeError)])
def test_bad_scale(scale, error):
    with pytest.raises(error, match="scale must be"):
        elastic_attention(*_qkv(1, 4, 2, 8, 16, torch.float32), scale=scale)


def test_bad_causal_shorter_keys():
    with pytest.raises(ValueError, match="k's length"):
        elastic_attention(*_qkv(1, 4, 2, 8, 16, torch.float32, sk=4))


def test_bad_decode_cache_lens():
    q, kc, vc = randn(2, 4, 16), randn(2, 2, 10, 16), randn(2, 2, 10, 16)
    with pytest.raises(ValueError, match=r"cache_lens values must be in \[1, 10\]"):
        elastic_attention_decode(q, kc, vc, torch.tensor([3, 11], device=DEVICE))
    with pytest.raises(ValueError, match=r"cache_lens values"):
        elastic_attention_decode(q, kc, vc, torch.tensor([0, 4], device=DEVICE))


def test_bad_decode_cache_lens_dtype():
    q, kc, vc = randn(2, 4, 16), randn(2, 2, 10, 16), randn(2, 2, 10, 16)
    with pytest.raises(TypeError, match="cache_lens must be an integer tensor"):
        elastic_attention_decode(q, kc, vc, torch.tensor([3.0, 4.0], device=DEVICE))


def test_bad_decode_num_heads():
    q, kc, vc = randn(2, 4, 16), randn(2, 2, 10, 16), randn(2, 2, 10, 16)
    with pytest.raises(ValueError, match="num_heads"):
        elastic_attention_decode(q, kc, vc, torch.tensor([3, 4], device=DEVICE), torch.tensor([2, 3], device=DEVICE))


def test_bad_decode_shape():
    q, kc = randn(2, 4, 16), randn(2, 2, 10, 16)
    with pytest.raises(ValueError, match="v_cache must have k_cache's shape"):
        elastic_attention_decode(q, kc, randn(2, 2, 11, 16), torch.tensor([3, 4], device=DEVICE))


def _decode_calls():
    """(name, args, kwargs, lean expected to take it) for the decode's argument checks: the common calls, then each
    kind of call the lean check leaves to the full one (bad input, and good input out of the ordinary)."""
    b, d = 3, 32
    q, kc, vc = randn(b, 8, d), randn(b, 2, 10, d), randn(b, 2, 10, d)
    lens, heads = torch.tensor([3, 10, 1], device=DEVICE), torch.tensor([4, 8, 4], device=DEVICE, dtype=torch.int32)
    half = [t.half() for t in (q, kc, vc)]
    yield "int32 heads", (q, kc, vc, lens.int(), heads), {}, True
    yield "int64 heads and scale", (q, kc, vc, lens, heads.long()), {"scale": 0.3}, True
    yield "no heads, fp16", (*half, lens, None), {}, True
    yield "strided cache", (q, kc.transpose(1, 2).contiguous().transpose(1, 2), vc, lens, heads), {}, True
    yield "int8 lens", (q, kc, vc, lens.to(torch.int8), heads), {}, False
    yield "int heads", (q, kc, vc, lens, 4), {}, False
    yield "list heads", (q, kc, vc, lens, [4, 8, 4]), {}, False
    yield "int scale", (q, kc, vc, lens, heads), {"scale": 1}, False
    yield "parameter q", (torch.nn.Parameter(q), kc, vc, lens, heads), {}, False
    yield "bool scale", (q, kc, vc, lens, heads), {"scale": True}, False
    yield "float lens", (q, kc, vc, lens.float(), heads), {}, False
    yield "bool heads", (q, kc, vc, lens, heads.bool()), {}, False
    yield "lens shape", (q, kc, vc, lens[:2], heads), {}, False
    yield "heads shape", (q, kc, vc, lens, heads[:2]), {}, False
    yield "q 4-D", (q[:, :, None], kc, vc, lens, heads), {}, False
    yield "v shape", (q, kc, vc[:, :, :9], lens, heads), {}, False
    yield "mixed dtypes", (q, kc.half(), vc, lens, heads), {}, False
    yield "int q", (q.int(), kc, vc, lens, heads), {}, False
    yield "batch", (q[:2], kc, vc, lens[:2], heads[:2]), {}, False
    yield "head dim", (q[..., :24], kc[..., :24], vc[..., :24], lens, heads), {}, False
    yield "group", (q[:, :7], kc, vc, lens, heads), {}, False
    yield "empty batch", (q[:0], kc[:0], vc[:0], lens[:0], heads[:0]), {}, False
    if ON_GPU:
        yield "lens on the host", (q, kc, vc, lens.cpu(), heads), {}, False
        yield "heads on the host", (q, kc, vc, lens, heads.cpu()), {}, False
        yield "cache on the host", (q, kc.cpu(), vc.cpu(), lens, heads), {}, False


def test_decode_lean_check_accepts_only_what_the_check_accepts():
    """The unvalidated decode call's lean check (a model's decode step) gives the heads the full check gives, or
    leaves the call to it: never passes input the full check rejects, never returns other heads."""
    dec = importlib.import_module("flextron_kernels.elastic_attention_decode")
    for name, args, kw, common in _decode_calls():
        lean = dec._lean_heads(*args, kw.get("scale"))
        assert (lean is not None) == common, name
        try:
            full = dec._check(*args, kw.get("scale"), False)
        except (TypeError, ValueError):
            full = None
        if lean is not None:
            assert full is not None and lean.dtype == torch.int32 and torch.equal(lean, full), name
            # what the lean path then runs (on CUDA): the kernels, as the validated call runs them
            scale = kw.get("scale", 1 / args[0].shape[2] ** 0.5)
            assert torch.equal(dec.decode(*args[:4], lean, scale), elastic_attention_decode(*args, **kw)), name
    with torch.autocast(DEVICE, dtype=torch.bfloat16):  # the full path casts under autocast
        assert dec._lean_heads(*next(_decode_calls())[1], None) is None


@pytest.mark.skipif(not ON_GPU, reason="the lean check serves CUDA calls (the interpreter takes the full path)")
def test_decode_unvalidated_call_takes_the_lean_check(monkeypatch):
    """validate=False on CUDA runs the decode after the lean check only, with _check's results; bad input still
    reaches _check, which names it."""
    dec = importlib.import_module("flextron_kernels.elastic_attention_decode")
    want = {name: elastic_attention_decode(*args, **kw) for name, args, kw, common in _decode_calls() if common}

    def refuse(*args):
        raise AssertionError("the full check ran")

    monkeypatch.setattr(dec, "_check", refuse)
    for name, args, kw, common in _decode_calls():
        if common:
            assert torch.equal(elastic_attention_decode(*args, **kw, validate=False), want[name]), name
        else:
            with pytest.raises(AssertionError, match="the full check ran"):
                elastic_attention_decode(*args, **kw, validate=False)
    with pytest.raises(AssertionError, match="the full check ran"):
        elastic_attention_decode(*next(_decode_calls())[1])  # validate=True


@pytest.mark.skipif(not ON_GPU, reason="CUDA graph capture needs CUDA")
def test_decode_under_cuda_graph():
    """No host sync during capture: validation is skipped, and the replay matches eager."""
    q, kc, vc = randn(2, 8, 64), randn(2, 2, 512, 64), randn(2, 2, 512, 64)
    lens, heads = torch.tensor([100, 512], device=DEVICE), torch.tensor([4, 8], device=DEVICE)
    eager = elastic_attention_decode(q, kc, vc, lens, heads)  # compiles and tunes outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = elastic_attention_decode(q, kc, vc, lens, heads)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


def test_unvalidated_budgets_are_clamped():
    """validate=False skips the host sync; a count past Hq then keeps all heads and one of 0 keeps none."""
    q, k, v = _qkv(2, 4, 2, 20, 16, torch.float32, requires_grad=False)
    o = elastic_attention(q, k, v, torch.tensor([9, 0], device=DEVICE), validate=False)
    assert_close(o, elastic_attention_ref(q.double(), k.double(), v.double(), torch.tensor([4, 0])), torch.float32)
    lens = torch.tensor([20, 7], device=DEVICE)
    od = elastic_attention_decode(q[:, :, -1], k, v, lens, torch.tensor([9, 0], device=DEVICE), validate=False)
    assert_close(od, _decode_ref(q[:, :, -1], k, v, lens, torch.tensor([4, 0])), torch.float32)
