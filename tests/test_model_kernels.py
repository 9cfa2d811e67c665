"""The model layer on the Triton kernels: elastic attention (prefill and decode), per-sequence head budgets,
per-token MLP widths. Head dim 16 so the attention kernels apply (the other model tests use 8: SDPA)."""

import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

import flextron.attention as fattn
import flextron.mlp as fmlp
from flextron import FlextronModel, Subnet
from flextron_kernels.reference import nested_mlp_ref
from tests.model_utils import masked_reference, rel
from tests.utils import DEVICE, assert_close, randn

VOCAB = 80


def _model(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=80, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=1, pad_token_id=None)
    return LlamaForCausalLM(cfg).eval().to(DEVICE)


def _ids(batch=2, seq=11, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch, seq), generator=g).to(DEVICE)


@pytest.fixture
def calls(monkeypatch):
    """Counts the kernel launches the model layer makes (so a silent fallback to SDPA fails the test). The Triton
    backend is pinned: on a GPU, heads every sequence shares would otherwise run SDPA (tested elsewhere)."""
    n = {"prefill": 0, "decode": 0, "nested": 0}
    monkeypatch.setattr(sys.modules["flextron_kernels.elastic_attention"], "_backend", "triton")

    def wrap(name, key, module):
        fn = getattr(module, name)

        def counted(*a, **k):
            n[key] += 1
            return fn(*a, **k)

        monkeypatch.setattr(module, name, counted)

    wrap("elastic_attention", "prefill", fattn)
    wrap("elastic_attention_decode", "decode", fattn)
    wrap("nested_mlp", "nested", fmlp)
    return n


def test_prefill_and_generate_on_kernels_match_hf(calls):
    hf = _model()
    ref_full = masked_reference(hf, Subnet(mlp=[80, 80], heads=[4, 4]))
    fm = FlextronModel.from_hf(hf)
    subnet = Subnet(mlp=[40, 80], heads=[2, 4])
    ref = masked_reference(ref_full, subnet)
    fm.set_subnet(subnet)
    ids = _ids()
    with torch.no_grad():
        out = fm(ids).logits
        want = ref(ids).logits
    assert calls["prefill"] == 2, calls
    assert rel(out, want) < 1e-4
    gen = fm.generate(ids, max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(ids))
    gen_ref = ref.generate(ids, max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(ids))
    assert calls["decode"] > 0, calls
    assert torch.equal(gen, gen_ref)


def test_head_budgets_per_sequence(calls):
    fm = FlextronModel.from_hf(_model(1))
    ids = _ids(batch=2)
    with torch.no_grad():
        mixed = fm(ids, head_budgets=torch.tensor([2, 4], device=DEVICE)).logits
        fm.set_subnet(Subnet(mlp=[80, 80], heads=[2, 2]))
        small = fm(ids[:1]).logits
        fm.set_subnet(None)
        full = fm(ids[1:]).logits
    assert calls["prefill"] >= 2
    assert rel(mixed[:1], small) < 1e-4
    assert rel(mixed[1:], full) < 1e-4
    # A budget above a layer's active heads is capped there: with heads=[2, 2] both sequences run 2 heads.
    fm.set_subnet(Subnet(mlp=[80, 80], heads=[2, 2]))
    with torch.no_grad():
        capped = fm(ids, head_budgets=torch.tensor([4, 4], device=DEVICE)).logits
    assert rel(capped[:1], small) < 1e-4
    # Budgets are kept through generate (prefill and decode) and cleared afterwards.
    fm.set_subnet(None)
    gen = fm.generate(ids, max_new_tokens=3, do_sample=False, attention_mask=torch.ones_like(ids),
                      head_budgets=torch.tensor([2, 4], device=DEVICE))
    fm.set_subnet(Subnet(mlp=[80, 80], heads=[2, 2]))
    gen0 = fm.generate(ids[:1], max_new_tokens=3, do_sample=False, attention_mask=torch.ones_like(ids[:1]))
    assert torch.equal(gen[:1], gen0)
    assert all(a.head_budgets is None for a in fm.attention_blocks)


def test_head_budgets_bad_input():
    fm = FlextronModel.from_hf(_model())
    with pytest.raises(TypeError, match="head_budgets"):
        fm(_ids(), head_budgets=torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="head_budgets"):
        fm(_ids(), head_budgets=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="head_budgets"):
        fm(_ids(), head_budgets=torch.tensor([2, 2, 2]))


def test_per_token_mlp_widths(calls):
    fm = FlextronModel.from_hf(_model(2))
    mlp = fm.mlp_blocks[0]
    x = torch.randn(2, 9, 64, device=DEVICE)
    widths = torch.tensor([[8, 80, 40, 16, 72, 1, 80, 33, 8]] * 2, device=DEVICE)
    with torch.no_grad():
        y = mlp(x, widths)
        want = nested_mlp_ref(x.double(), mlp.up_weight().double(), mlp.down_weight().double(), widths,
                              gate_weight=mlp.gate_weight().double())
    assert calls["nested"] == 1
    assert rel(y, want) < 1e-5
    # Every token at one width through the whole model equals the uniform subnet of that width.
    ids = _ids()
    for m in fm.mlp_blocks:
        m.token_widths = torch.full(ids.shape, 40, device=DEVICE)
    with torch.no_grad():
        routed = fm(ids).logits
    for m in fm.mlp_blocks:
        m.token_widths = None
    fm.set_subnet(Subnet(mlp=[40, 40], heads=[4, 4]))
    with torch.no_grad():
        uniform = fm(ids).logits
    assert rel(routed, uniform) < 1e-5
    with pytest.raises(ValueError, match="widths"):
        mlp(x, widths[:, :3])


def test_torch_compile_whole_model():
    """A FlextronModel (head budgets, per-token MLP widths) under torch.compile: one graph, no graph break (each
    kernel is an opaque custom op), logits equal to eager's (exactly on CPU; within float32 rounding on CUDA, where
    the traced graph's own torch ops round differently: the plain HF model under aot_eager differed from eager by
    1.3e-7 on an H200, the FlextronModel by 2e-7 relative), and a training step's loss and gradients equal to
    eager's within float32 rounding."""
    torch._dynamo.reset()
    fm = FlextronModel.from_hf(_model(4))
    fm.set_subnet(Subnet(mlp=[40, 80], heads=[2, 4]))
    ids = _ids()
    g = torch.Generator().manual_seed(5)
    for m in fm.mlp_blocks:
        m.token_widths = torch.randint(1, 81, ids.shape, generator=g).to(DEVICE)
    explained = torch._dynamo.explain(fm)(ids)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(fm, backend="aot_eager")
    with torch.no_grad():
        got, want = compiled(ids).logits, fm(ids).logits
    if DEVICE == "cpu":
        assert torch.equal(got, want)
    else:
        assert rel(got, want) < 1e-6
    params = [p for p in fm.parameters() if p.requires_grad]
    losses, grads = [], []
    for model in (fm, compiled):
        loss = model(ids, labels=ids).loss
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, params, allow_unused=True))
    assert torch.allclose(losses[0], losses[1], rtol=1e-6, atol=0)
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if a is not None:
            assert rel(b, a) < 1e-5


def test_generate_with_compiled_forward(calls):
    """Greedy generation with the model's forward under torch.compile (prefill and the decode steps against the cache:
    elastic_attention_decode as its custom op, no graph break) gives the eager tokens."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    fm = FlextronModel.from_hf(_model(6))
    fm.set_subnet(Subnet(mlp=[40, 80], heads=[2, 4]))
    ids = _ids()
    kw = dict(max_new_tokens=5, do_sample=False, attention_mask=torch.ones_like(ids))
    want = fm.generate(ids, **kw)
    assert calls["prefill"] > 0 and calls["decode"] > 0, calls  # the kernels' paths, not SDPA's
    fm.forward = torch.compile(fm.forward, backend="aot_eager")
    assert torch.equal(fm.generate(ids, **kw), want)
    assert not torch._dynamo.utils.counters["graph_break"]


def test_no_padding_drops_a_materialised_causal_mask(calls):
    """Under ``no_padding()`` a plain causal mask (what transformers builds during CUDA-graph capture) no longer
    sends attention to SDPA: the causal kernel runs, with the same result."""
    from flextron.attention import attention_core, no_padding

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 16, device=DEVICE) for _ in range(3))
    mask = torch.ones(9, 9, dtype=torch.bool, device=DEVICE).tril()[None, None].expand(2, 1, 9, 9)
    ref = attention_core(q, k, v, mask, scaling=0.25)
    assert calls["prefill"] == 0  # a mask: SDPA
    with no_padding():
        out = attention_core(q, k, v, mask, scaling=0.25)
    assert calls["prefill"] == 1
    assert rel(out, ref) < 1e-5


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("budgets", [False, True], ids=["all-heads", "budgets"])
@pytest.mark.parametrize("mask_kind", ["bool", "additive", "per-head", "one-for-the-batch"])
def test_masked_one_query_packs_gqa(mask_kind, budgets):
    """One query per sequence with a mask (left padding, a sliding window) under GQA: SDPA runs on the KV heads
    with each group's query heads packed as queries, no copy of K/V; the result is attention over the expanded K/V
    (float64 reference), zeros past each sequence's budget."""
    torch.manual_seed(0)
    b, h, kv, sk, d = 3, 8, 2, 13, 16
    q, k, v = randn(b, h, 1, d), randn(b, kv, sk, d), randn(b, kv, sk, d)
    keep = torch.rand(b, h if mask_kind == "per-head" else 1, 1, sk, device=DEVICE) > 0.4
    keep[..., -1] = True  # every query sees its own key
    if mask_kind == "one-for-the-batch":
        keep = keep[:1]
    mask = keep if mask_kind != "additive" else torch.zeros(keep.shape, device=DEVICE).masked_fill(~keep, -torch.inf)
    heads = torch.tensor([8, 4, 2], device=DEVICE) if budgets else None
    with _Ops() as ops:
        out = fattn.attention_core(q, k, v, mask, scaling=0.3, head_budgets=heads)
    assert "repeat_interleave" not in ops.names and "expand" not in ops.names, ops.names
    kr, vr = (t.double().repeat_interleave(h // kv, dim=1) for t in (k, v))
    scores = (q.double() @ kr.transpose(-1, -2) * 0.3).masked_fill(~keep, -torch.inf)
    ref = (scores.softmax(-1) @ vr)
    if budgets:
        ref = ref * (torch.arange(h, device=DEVICE)[None, :] < heads[:, None])[..., None, None]
    assert out.shape == (b, 1, h, d)
    assert_close(out, ref.transpose(1, 2), torch.float32)
