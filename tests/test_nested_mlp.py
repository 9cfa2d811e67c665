"""nested_mlp against a float64 per-token reference: width mixes, odd shapes, dtypes, gradients, routing, bad input.

Over ~500 lines as one file: the cases share the reference, the plan fixtures and the launch recorders below."""

import contextlib
import importlib
import math

import pytest
import torch

from flextron_kernels import nested_mlp
from flextron_kernels._hopper import tma_sms
from flextron_kernels.nested_mlp import graphs, launch, op
from flextron_kernels.nested_mlp import plan as nm_plan
from flextron_kernels.reference import nested_mlp_ref
from flextron_kernels.routing import nested_mlp_routing
from tests.utils import DEVICE, DTYPES, ON_GPU, assert_close, poisoned_allocations, randn

H, I = 48, 200  # I off every tile multiple on purpose


@pytest.fixture(autouse=True)
def _kernels_for_training():
    """These tests are about the kernels: calls that record autograd launch them on a GPU too, where small eager
    calls would otherwise run as torch ops (test_nested_mlp_training_path.py)."""
    with op.training_path("kernels"):
        yield


def _widths(kind: str, T: int, inter: int = I) -> torch.Tensor:
    g = torch.Generator().manual_seed(T * 31 + len(kind))
    if kind == "mixed":  # any integer in [1, I]
        w = torch.randint(1, inter + 1, (T,), generator=g)
    elif kind == "few":  # a small space of choices, none a tile multiple, one of them empty in this batch
        w = torch.tensor([inter, 151, 77, 3])[torch.randint(0, 4, (T,), generator=g)]
        w[w == 151] = 77  # the 151 group is empty
    elif kind == "one_per_width":
        w = torch.randperm(inter, generator=g)[:T] + 1
    elif kind == "full":
        w = torch.full((T,), inter)
    elif kind == "one":
        w = torch.ones(T, dtype=torch.long)
    else:
        raise ValueError(kind)
    return w.to(DEVICE)


def _params(dtype, gated: bool, biases: bool, inter: int = I, hidden: int = H):
    p = {
        "up_weight": randn(inter, hidden, dtype=dtype, scale=hidden**-0.5, requires_grad=True),
        "down_weight": randn(hidden, inter, dtype=dtype, scale=inter**-0.5, requires_grad=True),
    }
    if gated:
        p["gate_weight"] = randn(inter, hidden, dtype=dtype, scale=hidden**-0.5, requires_grad=True)
    if biases:
        p["up_bias"] = randn(inter, dtype=dtype, scale=0.5, requires_grad=True)
        p["down_bias"] = randn(hidden, dtype=dtype, scale=0.5, requires_grad=True)
    return p


def _run(x, widths, params, activation, dtype, grad_scale=2.0):
    """Run op and float64 reference forward and backward; compare output and every gradient."""
    with poisoned_allocations():
        y = nested_mlp(x, params["up_weight"], params["down_weight"], widths, activation=activation,
                       **{k: v for k, v in params.items() if k not in ("up_weight", "down_weight")})
        dy = randn(*y.shape, dtype=dtype)
        y.backward(dy)
    assert y.shape == x.shape and y.dtype == dtype
    xr = x.detach().double().requires_grad_()
    pr = {k: v.detach().double().requires_grad_() for k, v in params.items()}
    yr = nested_mlp_ref(xr, pr["up_weight"], pr["down_weight"], widths, activation=activation,
                        **{k: v for k, v in pr.items() if k not in ("up_weight", "down_weight")})
    yr.backward(dy.double())
    assert_close(y, yr, dtype, "y")
    assert_close(x.grad, xr.grad, dtype, "dx", grad_scale)
    for k in params:
        assert_close(params[k].grad, pr[k].grad, dtype, f"d{k}", grad_scale)
    # Exactly zero outside the neurons any token used.
    wmax = int(widths.max())
    assert torch.count_nonzero(params["up_weight"].grad[wmax:]) == 0
    assert torch.count_nonzero(params["down_weight"].grad[:, wmax:]) == 0
    if "gate_weight" in params:
        assert torch.count_nonzero(params["gate_weight"].grad[wmax:]) == 0
    if "up_bias" in params:
        assert torch.count_nonzero(params["up_bias"].grad[wmax:]) == 0


# (T, width kind): T=1, T below/above the unsorted threshold, T not a multiple of any row tile.
CASES = [(1, "mixed"), (7, "mixed"), (100, "mixed"), (100, "few"), (37, "one_per_width"),
         (70, "full"), (70, "one"), (130, "few")]


@pytest.mark.parametrize("T,kind", CASES)
def test_swiglu_fp32(T, kind):
    """Llama-style gated SiLU MLP without biases."""
    x = randn(T, H, requires_grad=True)
    _run(x, _widths(kind, T), _params(torch.float32, gated=True, biases=False), "silu", torch.float32)


@pytest.mark.parametrize("T,kind", [(1, "mixed"), (100, "few"), (70, "full")])
@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu", "relu"])
def test_gpt2_style_fp32(T, kind, activation):
    """GPT-2 style: ungated, biased up and down projections."""
    x = randn(T, H, requires_grad=True)
    _run(x, _widths(kind, T), _params(torch.float32, gated=False, biases=True), activation, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("T", [5, 90])
def test_half_dtypes(dtype, gated, T):
    x = randn(T, H, dtype=dtype, requires_grad=True)
    _run(x, _widths("few", T), _params(dtype, gated=gated, biases=not gated), "silu" if gated else "gelu_tanh", dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_with_biases_leading_dims(dtype):
    """Leading dims [2, 3, 11], a gate plus both biases, int32 widths."""
    x = randn(2, 3, 11, H, dtype=dtype, requires_grad=True)
    w = _widths("mixed", 66).to(torch.int32).view(2, 3, 11)
    _run(x, w, _params(dtype, gated=True, biases=True), "silu", dtype)


@pytest.fixture
def use_plan():
    """``use_plan(change)``: nested_mlp runs on ``change(plan)`` for the rest of the test (``plan.override``)."""
    with contextlib.ExitStack() as stack:
        yield lambda change: stack.enter_context(nm_plan.override(change))


def _kernels(tma, use_plan, plan_change=None):
    """The op's launch module, with ``plan_change(plan) -> plan`` applied to every launch plan and the TMA forms on
    (``tma``) or off; skips where TMA is asked for and the device has none."""
    if tma and not tma_sms(torch.device(DEVICE)):
        pytest.skip("no TMA on this device")

    def change(p):
        p = plan_change(p) if plan_change is not None else p
        return p if tma else p.replace(tma=False)
    use_plan(change)
    return launch


def _spy(nm, monkeypatch, name: str, record) -> list:
    """Kernel ``name`` replaced by one that appends ``record(grid, launch kwargs)`` to the list returned, then
    launches the real kernel. The up product's tail launch (its tail split's second launch) is not recorded."""
    seen = []
    real = getattr(nm, name)

    def launch(grid, a, k):
        if not k.get("TAIL_LAUNCH"):
            seen.append(record(grid, k))
        return real[grid](*a, **k)

    class Spy:
        def __getitem__(self, grid):
            return lambda *a, **k: launch(grid, a, k)
    monkeypatch.setattr(nm, name, Spy())
    return seen


@pytest.mark.parametrize("tma", ["host", "host-pointer-epilogue", False])
@pytest.mark.parametrize("gated", [True, False])
def test_sorted_path_tma_and_pointer(tma, gated, monkeypatch, use_plan):
    """The sorted path in every form: TMA tiles (x gathered to sorted order, weight boxes) with host descriptors,
    the up kernel's buffer tiles by TMA or by pointers, and pointer loads throughout; spies check which form ran,
    every call."""
    epi = (tma == "host")
    tma = bool(tma)
    # Every sorted-path plan asks for TMA, in the backward too; EPI_TMA picks the up kernel's buffer tiles' form.
    nm = _kernels(tma, use_plan, lambda p: p.replace(tma=True, tma_bwd=True, up=dict(p.up, EPI_TMA=epi)))
    seen = []
    real = nm.tma_ok
    monkeypatch.setattr(nm, "tma_ok", lambda *a: seen.append(real(*a)) or seen[-1])
    wgrad = _spy(nm, monkeypatch, "wgrad_kernel", lambda grid, k: k["TMA"])
    up = _spy(nm, monkeypatch, "up_kernel", lambda grid, k: k["EPI_TMA"])
    T = 150  # sorted on every device, not a multiple of any row tile
    x = randn(T, H, dtype=torch.bfloat16, requires_grad=True)
    _run(x, _widths("mixed", T), _params(torch.bfloat16, gated=gated, biases=not gated),
         "silu" if gated else "gelu_tanh", torch.bfloat16)
    assert len(seen) == 2 and all(s == tma for s in seen)  # forward, backward
    assert wgrad == [bool(tma)] * 2  # dWd, then dWu (and dWg)
    assert up == [epi] * 2  # forward, backward (dA)


@pytest.mark.parametrize("tma,T", [(True, 150), (False, 150), (False, 7)])  # 7: the unsorted (decode) tile
def test_split_k_down_and_taller_up_tiles(tma, T, monkeypatch, use_plan):
    """The down product split along K into fp32 chunks, summed by each tile's last chunk to finish (chunks past
    a tile's width skipped), under up tiles twice as tall as the down tiles; forward and backward (dx) split."""
    def plan(p):
        # Stages set here: taller tiles, and dx's two operands on the forward's config, within shared memory.
        up = dict(p.up, BLOCK_M=2 * p.down["BLOCK_M"], BLOCK_N=min(p.up["BLOCK_N"], 128), num_stages=3)
        down = dict(p.down, SPLIT_K=4, BLOCK_K=min(p.down["BLOCK_K"], 64), num_stages=3)
        return p.replace(tma=True, tma_bwd=True, up=up, down=down, down_bwd={})  # dx on the forward's config
    nm = _kernels(tma, use_plan, plan)
    launches = _spy(nm, monkeypatch, "down_kernel", lambda grid, k: k["SPLIT"])
    x = randn(T, H, dtype=torch.bfloat16, requires_grad=True)
    w, params_ = _widths("mixed", T), _params(torch.bfloat16, gated=True, biases=True)
    _run(x, w, params_, "silu", torch.bfloat16)
    assert launches == [True, True]  # forward y, backward dx
    # Deterministic: the partials are summed in chunk order whichever chunk finishes last (a real check on a GPU,
    # where chunks race; the interpreter runs programs in order).
    with torch.no_grad():
        args = (x, params_["up_weight"], params_["down_weight"], w)
        kw = {k: v for k, v in params_.items() if k not in ("up_weight", "down_weight")}
        ys = [nested_mlp(*args, **kw) for _ in range(3)]
    assert all(torch.equal(ys[0], y) for y in ys[1:])


@pytest.mark.parametrize("tma", [True, False])
@pytest.mark.parametrize("sms", [1, 24, 64])
def test_split_k_fill(tma, sms, monkeypatch, use_plan):
    """``SPLIT_K="fill"``: as many K chunks as keep one program per SM (the SM count over the output tiles, 1 to 4),
    counted from the launch grid; forward and backward against the reference; bad values named."""
    def plan(p):
        down = dict(p.down, SPLIT_K="fill", BLOCK_N=32, BLOCK_K=min(p.down["BLOCK_K"], 64))
        return p.replace(tma=True, tma_bwd=True, down=down, down_bwd={"SPLIT_K": 1})
    nm = _kernels(tma, use_plan, lambda p: plan(p).replace(sms=sms))
    grids = _spy(nm, monkeypatch, "down_kernel", lambda grid, k: (grid, k["BLOCK_M"]))
    T = 150
    x = randn(T, H, dtype=torch.bfloat16, requires_grad=True)
    _run(x, _widths("mixed", T), _params(torch.bfloat16, gated=True, biases=True), "silu", torch.bfloat16)
    (fwd, bm), (bwd, _) = grids
    tiles = -(-T // bm) * -(-H // 32)
    assert fwd == (tiles, max(1, min(4, sms // tiles))) and bwd[1] == 1
    for bad in (0, "all", 2.0):
        with pytest.raises(ValueError, match="SPLIT_K"):
            nm_plan.down_splits(T, H, {"BLOCK_M": 64, "BLOCK_N": 32, "SPLIT_K": bad}, sms)


@pytest.mark.parametrize("tma", [True, False])
def test_dx_own_config(tma, monkeypatch, use_plan):
    """dx (the backward's down product) on the plan's ``down_bwd`` changes: the forward's down product split along K,
    dx whole, with narrower column tiles; against the reference, the spy checking each launch's form."""
    nm = _kernels(tma, use_plan, lambda p: p.replace(tma=True, tma_bwd=True, down=dict(p.down, SPLIT_K=2),
                                                   down_bwd={"SPLIT_K": 1, "BLOCK_N": 32}))
    launches = _spy(nm, monkeypatch, "down_kernel", lambda grid, k: (k["DUAL"], k["SPLIT"], k["BLOCK_N"]))
    x = randn(150, H, dtype=torch.bfloat16, requires_grad=True)
    _run(x, _widths("mixed", 150), _params(torch.bfloat16, gated=True, biases=True), "silu", torch.bfloat16)
    (f_dual, f_split, _), (b_dual, b_split, b_bn) = launches
    assert not f_dual and f_split and b_dual and not b_split and b_bn == 32


@pytest.mark.parametrize("tma", [True, False])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("ratio,rows", [(2, 1), (0.5, 1), (2, 0.5), (1, 0.5)])
def test_backward_up_kernel_other_blocks(tma, gated, ratio, rows, monkeypatch, use_plan):
    """The backward's up kernel (dA) in N blocks twice or half the forward's, and in row tiles as tall or half as
    tall: its buffers are wider or narrower than the forward's pre-activation buffers it reads (I = 312 pads to
    different widths; its bf16 rows are 16-byte multiples, so the TMA form does run), its shorter tiles read blocks
    the forward's taller tile wrote, and dx (in dA's row tiles) and the weight gradients read its buffers (to the
    smaller block's pad)."""
    def plan(p):
        up = dict(p.up, BLOCK_N=min(p.up["BLOCK_N"], 128))
        bn, bm = int(up["BLOCK_N"] * ratio), int(up["BLOCK_M"] * rows)
        return p.replace(tma=True, tma_bwd=True, up=up, up_bwd={"BLOCK_N": bn, "BLOCK_M": bm},
                    down_bwd=dict(p.down_bwd, BLOCK_M=min(bm, p.down["BLOCK_M"])),
                    wgrad=dict(p.wgrad, BLOCK_J=min(p.wgrad["BLOCK_J"], bn, up["BLOCK_N"])))
    nm = _kernels(tma, use_plan, plan)
    blocks = _spy(nm, monkeypatch, "up_kernel", lambda grid, k: (k["BACKWARD"], k["BLOCK_N"], k["BLOCK_M"]))
    inter, T = 312, 150
    x = randn(T, H, dtype=torch.bfloat16, requires_grad=True)
    _run(x, _widths("mixed", T, inter), _params(torch.bfloat16, gated=gated, biases=not gated, inter=inter),
         "silu" if gated else "gelu_tanh", torch.bfloat16)
    (f, bn, bm), (b, bn2, bm2) = blocks
    assert not f and b and bn2 == int(ratio * bn) and bm2 == int(rows * bm)


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("kind", ["mixed", "full"])
def test_wgrad_tma_store_epilogue(gated, kind, monkeypatch, use_plan):
    """The weight gradients' tiles stored by TMA (EPI_TMA): dWu and dWg as [I, H] boxes, dWd through its transpose;
    I = 312 and H = 48 end inside a tile (the boxes are clipped at the edges); against the reference, and the spy
    checks the launches took that form."""
    nm = _kernels(True, use_plan, lambda p: p.replace(tma=True, tma_bwd=True, wgrad=dict(p.wgrad, EPI_TMA=True)))
    seen = _spy(nm, monkeypatch, "wgrad_kernel", lambda grid, k: (k["EPI_TMA"], k["C1_T"]))
    inter, T = 312, 150
    x = randn(T, H, dtype=torch.bfloat16, requires_grad=True)
    _run(x, _widths(kind, T, inter), _params(torch.bfloat16, gated=gated, biases=not gated, inter=inter),
         "silu" if gated else "gelu_tanh", torch.bfloat16)
    assert seen == [(True, True), (True, False)]  # dWd (transposed), then dWu (and dWg)


def _tail_rule(nb: list[int], nsm: int, parts: int, rounds: int = 1) -> tuple[int, int]:
    """The up product's tail split worked out on the host from the row tiles' active N block counts (the rule of
    _tail_prep_kernel, in Python): (the head's N block limit, or None for all; narrow tail tiles)."""
    cols = [sum(n > c for n in nb) for c in range(max(nb))]
    total = sum(cols)
    whole = total // nsm * nsm
    n_end, run = 0, 0
    for c in cols:
        if run + c > whole:
            break
        run += c
        n_end += 1
    tail = total - run
    if -(-tail * parts // nsm) < parts * -(-tail // nsm) and tail * parts <= rounds * nsm:
        return n_end, tail * parts
    return None, 0


# (tma, gated, programs per wave, widths, parts, waves of tail programs): with 32x64 up tiles, 150 tokens and I = 312
# the row tiles have 5/4/3/2/1 ("mixed"), 5/2/2/2/1 ("few") or 5 x 5 ("full") active N blocks.
TAIL_CASES = [(True, True, 7, "mixed", 2, 1), (False, False, 64, "mixed", 4, 1), (True, False, 5, "few", 2, 1),
              (False, True, 8, "full", 4, 3), (True, True, 4, "full", 2, 3), (True, False, 15, "mixed", 2, 1),
              (True, True, 9, "full", 2, 3)]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("tma,gated,sms,kind,parts,rounds", TAIL_CASES)
def test_up_tail_split(tma, gated, sms, kind, parts, rounds, fused, monkeypatch, use_plan):
    """The up product's tail split: a head launch over the tile grid's first N blocks (whole waves of ``sms``
    programs), then a launch of the remaining tiles cut along N into ``parts`` narrower ones, forward (the backward's
    dA runs whole); against the reference, with the device's plan checked against the rule worked out here. The plan
    comes from the routing's one launch (``fused``) or from a launch of its own."""
    def plan(p):  # the same tiles on every device, so the cases above hold (dA on the forward's N blocks)
        up = dict(p.up, BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, TAIL=parts, TAIL_ROUNDS=rounds)
        return p.replace(tma=True, tma_bwd=True, sms=sms, up=up, down=dict(p.down, BLOCK_M=32),
                         up_bwd=dict(p.up_bwd, BLOCK_N=64), wgrad=dict(p.wgrad, BLOCK_J=64))
    nm = _kernels(tma, use_plan, lambda p: plan(p).replace(fused_route=fused))
    routes = _spy(nm, monkeypatch, "route_kernel", lambda grid, k: (k["RANK"], k["GATHER"], k["PLAN"]))
    launches = []
    real = nm.up_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*a, **k):
                launches.append((grid[0], k["TAIL_LAUNCH"], k["BACKWARD"], a[k_plan]))
                return real[grid](*a, **k)
            return launch
    k_plan = list(real.arg_names).index("plan_ptr")
    monkeypatch.setattr(nm, "up_kernel", Spy())
    T, inter, hidden = 150, 312, 256  # rows of 16-byte multiples (TMA)
    x = randn(T, hidden, dtype=torch.bfloat16, requires_grad=True)
    w = _widths(kind, T, inter)
    params_ = _params(torch.bfloat16, gated=gated, biases=not gated, inter=inter, hidden=hidden)
    act = "silu" if gated else "gelu_tanh"
    _run(x, w, params_, act, torch.bfloat16)
    assert [(g, t, b) for g, t, b, _ in launches] == [(25, False, False), (rounds * sms, True, False),
                                                       (25, False, True)]  # forward head and tail; dA
    nb = [-(-int(w.sort(descending=True).values[m * 32]) // 64) for m in range(5)]
    n_end, units = _tail_rule(nb, sms, parts, rounds)
    tail_plan = launches[1][3].tolist()
    assert tail_plan[1] == units and (n_end is None and tail_plan[0] >= 5 or tail_plan[0] == n_end), tail_plan
    assert (units == 0) == ((kind, sms) == ("mixed", 15))  # one case where nothing splits (15 tiles, 15 programs)
    assert routes == [(fused, fused and bool(tma), True)]


# (T, tokens per width kind, the up product's tail split in parts, down split-K chunks, strided x)
ROUTE_CASES = [(150, "mixed", 4, 2, False), (150, "few", 1, 1, True), (1, "full", 2, 4, False),
               (33, "one", 1, 4, True), (300, "one_per_width", 2, 1, False)]


@pytest.mark.parametrize("T,kind,parts,splits,strided", ROUTE_CASES)
def test_route_launch(T, kind, parts, splits, strided, monkeypatch, use_plan):
    """The routing's one launch against torch: the stable descending sort of the widths, ``x``'s rows gathered in
    that order (exactly; ``x`` with a column stride too), the down product's split-K counts zeroed (poisoned memory
    before), and the tail plan as worked out on the host."""
    def plan(p):
        up = dict(p.up, BLOCK_M=32, BLOCK_N=64, TAIL=parts, TAIL_ROUNDS=2)
        return p.replace(sorted=True, tma=True, fused_route=True, sms=5, up=up,
                         down=dict(p.down, BLOCK_M=32, SPLIT_K=splits))
    nm = _kernels(False, use_plan, plan)
    launches = _spy(nm, monkeypatch, "route_kernel", lambda grid, k: grid)
    inter, hidden = 300, 96
    x = randn(hidden, T, dtype=torch.bfloat16).t() if strided else randn(T, hidden, dtype=torch.bfloat16)
    w = _widths(kind, T, inter).to(torch.int32)
    p = nm_plan.plan_for(T, torch.bfloat16)
    real_empty = torch.empty

    def poisoned(*a, **k):  # integer scratch full of -1: the counts must be zeroed
        t = real_empty(*a, **k)
        return t.fill_(-1) if not t.is_floating_point() else t.fill_(float("nan"))
    monkeypatch.setattr(torch, "empty", poisoned)
    sw, order, src, tail_plan, counts = nm.route(x, w, inter, p, True, p.sms)
    monkeypatch.setattr(torch, "empty", real_empty)
    assert len(launches) == 1
    ref = torch.sort(w.cpu(), descending=True, stable=True)
    assert torch.equal(order.cpu(), ref.indices) and torch.equal(sw.cpu(), ref.values) and sw.dtype == w.dtype
    assert src.is_contiguous() and torch.equal(src, x[order])
    n_cnt = nm_plan.down_counts(T, hidden, inter, p.down, p.up["BLOCK_N"], True, p.sms)
    assert (n_cnt > 0) == (splits > 1 and inter > 64)
    if n_cnt:
        assert counts.numel() == n_cnt and int(counts.abs().sum()) == 0
    else:
        assert counts is None
    if parts == 1:
        assert tail_plan is None
    else:
        nb = [-(-int(ref.values[m * 32]) // 64) for m in range(-(-T // 32))]
        n_end, units = _tail_rule(nb, 5, parts, 2)
        got = tail_plan.tolist()
        assert got[1] == units and (n_end is None and got[0] >= max(nb) or got[0] == n_end), got


def test_up_tail_split_bad_config(use_plan):
    """A tail split into a part count that is not a power of two up to 8 is refused, naming the setting."""
    _kernels(True, use_plan, lambda p: p.replace(tma=True, up=dict(p.up, TAIL=3)))
    with pytest.raises(ValueError, match="TAIL"):
        nested_mlp(randn(150, H, dtype=torch.bfloat16), *(_params(torch.bfloat16, False, False).values()),
                      _widths("mixed", 150))


@pytest.mark.parametrize("gated", [True, False])
def test_backward_epilogue_in_halves(gated, monkeypatch, use_plan):
    """The backward's up kernel stores its epilogue (dA's activation derivative, the recomputed activation) in two
    half-width boxes; mixed widths so that rows end inside either half."""
    nm = _kernels(True, use_plan, lambda p: p.replace(tma=True, tma_bwd=True, up_bwd={"EPI_SPLIT": 2}))
    splits = _spy(nm, monkeypatch, "up_kernel", lambda grid, k: (k["BACKWARD"], k["EPI_SPLIT"]))
    T = 150
    x = randn(T, H, dtype=torch.bfloat16, requires_grad=True)
    _run(x, _widths("mixed", T), _params(torch.bfloat16, gated=gated, biases=not gated),
         "silu" if gated else "gelu_tanh", torch.bfloat16)
    assert splits == [(False, 1), (True, 2)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("T", [17, 64, 65, 128, 129, 200, 256, 257, 384, 385, 1024, 1025, 8192])
def test_gpu_plan_consistent(T, dtype):
    """The GPU's plans (worked out here on any device) keep the kernels' shared-row and block rules: the down
    product's row tiles inside the up product's, dA's row tiles inside the forward's and dx's inside dA's (also where
    a test shrinks the forward's tiles, as the GPU tests above do), the buffers' columns a multiple of every N block
    and the weight-gradient blocks inside them."""
    plan = nm_plan.build(T, dtype, interpret=False)
    up, down = plan.up, plan.down
    assert up["BLOCK_M"] % down["BLOCK_M"] == 0 and nm_plan.BUF_COLS % up["BLOCK_N"] == 0
    bwd = nm_plan.up_bwd_cfg(plan)
    assert up["BLOCK_M"] % bwd["BLOCK_M"] == 0 and nm_plan.BUF_COLS % bwd["BLOCK_N"] == 0
    assert bwd["BLOCK_M"] % dict(down, **plan.down_bwd)["BLOCK_M"] == 0
    for rows in (16, 32):  # the forward's tiles shrunk (with the down product's), dA's follow
        shrunk = plan.replace(up=dict(up, BLOCK_M=rows), down=dict(down, BLOCK_M=rows),
                              down_bwd=dict(plan.down_bwd, BLOCK_M=rows))
        assert nm_plan.up_bwd_cfg(shrunk)["BLOCK_M"] == rows


@pytest.mark.skipif(not ON_GPU, reason="the GPU's block plans (the interpreter has its own)")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [200, 300, 520, 1100])
@pytest.mark.parametrize("fused", [False, True])
def test_gpu_plan_buckets(T, dtype, fused, use_plan):
    """Each token-count bucket of the GPU plan (up to 256 tokens 128-wide up tiles and the down product in K chunks
    filling a wave; to 384, 256-wide up tiles with the tail split and two K chunks; 128-row up tiles over 64-row
    down tiles; prefill tiles) in every dtype, against the float64 reference; with the routing in one launch
    (``fused_route``, up to 1024 tokens) and without."""
    use_plan(lambda p: p.replace(fused_route=fused))
    inter, hidden = 1000, 256
    x = randn(T, hidden, dtype=dtype, requires_grad=True)
    _run(x, _widths("mixed", T, inter), _params(dtype, gated=True, biases=True, inter=inter, hidden=hidden), "silu",
         dtype)


@pytest.mark.parametrize("tma", [True, False])
def test_wgrad_token_blocks_taller_than_row_tiles(tma, use_plan):
    """Weight-gradient token blocks taller than the up kernel's row tiles: a block's last rows then belong to tiles
    that never wrote this neuron block (poisoned memory); they must not reach the gradient."""
    _kernels(tma, use_plan, lambda p: p.replace(tma=True, tma_bwd=True, up=dict(p.up, BLOCK_M=16),
                                              down=dict(p.down, BLOCK_M=16), wgrad=dict(p.wgrad, BLOCK_T=64)))
    T = 150
    x = randn(T, H, dtype=torch.bfloat16, requires_grad=True)
    _run(x, _widths("few", T), _params(torch.bfloat16, gated=True, biases=True), "silu", torch.bfloat16)


def test_strided_input_and_weight_views():
    """A non-contiguous x and weights that are views with storage offsets: read through strides."""
    big = randn(40, 2 * H)
    x = big[:, 5:5 + H].detach().requires_grad_()
    wbig = randn(I + 3, H + 8, scale=H**-0.5)
    params = _params(torch.float32, gated=True, biases=False)
    params["up_weight"] = wbig[3:, 8:].detach().requires_grad_()
    assert not params["up_weight"].is_contiguous()
    _run(x, _widths("mixed", 40), params, "silu", torch.float32)


def test_forward_only_no_grad():
    p = _params(torch.float32, gated=True, biases=True)
    x, w = randn(50, H), _widths("few", 50)
    with torch.no_grad(), poisoned_allocations():
        y = nested_mlp(x, p["up_weight"], p["down_weight"], w, gate_weight=p["gate_weight"],
                       up_bias=p["up_bias"], down_bias=p["down_bias"])
    pr = {k: v.detach().double() for k, v in p.items()}
    yr = nested_mlp_ref(x.double(), pr["up_weight"], pr["down_weight"], w, gate_weight=pr["gate_weight"],
                        up_bias=pr["up_bias"], down_bias=pr["down_bias"])
    assert_close(y, yr, torch.float32)


def test_empty_batch():
    p = _params(torch.float32, gated=True, biases=False)
    y = nested_mlp(randn(0, H), p["up_weight"], p["down_weight"], torch.zeros(0, dtype=torch.long, device=DEVICE),
                   gate_weight=p["gate_weight"])
    assert y.shape == (0, H)


# ---------------------------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("T", [7, 100])  # one unsorted tile; sorted, with the tail split
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("frozen", [(), ("x", "up_weight", "down_bias")])
def test_torch_compile_fullgraph(T, gated, frozen):
    """Under torch.compile the call is one custom op with its backward registered (fullgraph: no graph break, and
    check_widths left on: its host sync is skipped while tracing). Output and the gradient of every input that
    needs one (``frozen`` ones do not) equal the eager op's exactly (the same kernels), and the output the float64
    reference's within tolerance."""
    torch._dynamo.reset()
    dt = torch.bfloat16
    p = _params(dt, gated=gated, biases=True)
    x = randn(T, H, dtype=dt, requires_grad=True)
    w = _widths("mixed", T)
    dy = randn(T, H, dtype=dt)
    act = "silu" if gated else "gelu_tanh"
    for name in frozen:
        (x if name == "x" else p[name]).requires_grad_(False)
    leaves = [t for t in (x, *p.values()) if t.requires_grad]

    def step(x, w, p):
        return nested_mlp(x, p["up_weight"], p["down_weight"], w, activation=act,
                          **{k: v for k, v in p.items() if k not in ("up_weight", "down_weight")})
    y_eager = step(x, w, p)
    g_eager = torch.autograd.grad(y_eager, leaves, dy)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    y = compiled(x, w, p)
    grads = torch.autograd.grad(y, leaves, dy)
    assert torch.equal(y, y_eager)
    assert all(torch.equal(a, b) for a, b in zip(grads, g_eager))
    pr = {k: v.detach().double() for k, v in p.items()}
    yr = nested_mlp_ref(x.detach().double(), pr["up_weight"], pr["down_weight"], w, activation=act,
                        **{k: v for k, v in pr.items() if k not in ("up_weight", "down_weight")})
    assert_close(y, yr, dt, "y")
    with torch.no_grad():  # inference: the op without the backward's buffers
        assert torch.equal(compiled(x, w, p), y_eager)


def test_custom_ops_opcheck():
    """torch.library.opcheck of the forward and backward custom ops: schema, autograd registration, fake tensors, and
    (where the outputs are deterministic) eager against AOT-dispatch tracing with dynamic shapes. The training
    forward's h and g are scratch past each row's width (never read, unwritten): that comparison does not apply."""
    T = 100
    args = [randn(T, H), randn(I, H), randn(H, I), _widths("mixed", T), randn(I, H), randn(I), randn(H)]
    op_fwd, op_bwd = torch.ops.flextron.nested_mlp_fwd.default, torch.ops.flextron.nested_mlp_bwd.default
    torch.library.opcheck(op_fwd, (*args, 0, False))
    grad_args = [a.requires_grad_() if a.is_floating_point() else a for a in args]
    torch.library.opcheck(op_fwd, (*grad_args, 0, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    x, up, down, w, gate, ub, db = (a.detach() for a in args)
    _, sw, order, h, g = op_fwd(x, up, down, w, gate, ub, db, 0, True)
    dy = randn(T, H)
    for need in ([True] * 6, [True, False, True, False, False, True]):
        torch.library.opcheck(op_bwd, (dy, x, up, down, gate, ub, sw, order, h, g, 0, True, need))


# ---------------------------------------------------------------------------------------------- routing


# The rank count in one program (T <= 1024 on a GPU) or split over programs (above; the interpreter splits at 64),
# or torch.sort above ``sort_above`` tokens (lowered here so that a small batch takes that path).
@pytest.mark.parametrize("sort_above", [None, 256])
@pytest.mark.parametrize("T", [300, 2500] if ON_GPU else [300])
@pytest.mark.parametrize("kind", ["mixed", "few", "full", "one"])
def test_routing_invariants(kind, T, sort_above, monkeypatch):
    if sort_above is not None:
        routing = importlib.import_module("flextron_kernels.routing")
        launches = _spy(routing, monkeypatch, "_rank_kernel", lambda grid, k: grid)
    w = _widths(kind, T)
    sw, order = nested_mlp_routing(w) if sort_above is None else nested_mlp_routing(w, sort_above=sort_above)
    assert order.dtype == torch.int64 and sw.dtype == w.dtype
    assert torch.equal(torch.sort(order.cpu()).values, torch.arange(T))  # a permutation
    # Exactly the stable descending sort (ties keep token order), computed independently by torch.
    ref = torch.sort(w.cpu(), descending=True, stable=True)
    assert torch.equal(order.cpu(), ref.indices) and torch.equal(sw.cpu(), ref.values)
    assert torch.equal(w[order], sw)  # sorted widths are the tokens' own
    assert bool((sw[:-1] >= sw[1:]).all())  # descending: a row tile's first row is its widest
    # Group offsets (histogram + cumsum) cover the batch exactly, each group contiguous in the order.
    values, counts = torch.unique_consecutive(sw, return_counts=True)
    assert int(counts.sum()) == T and len(values) == len(torch.unique(w))
    offsets = torch.cumsum(counts, 0) - counts
    for v, o, c in zip(values.tolist(), offsets.tolist(), counts.tolist()):
        assert bool((sw[o:o + c] == v).all())
    # Row tiles of any size: the tile's width (its first row) bounds every row, tiles cover [0, T).
    for bm in (16, 64, 128):
        tiles = sw[::bm]
        assert len(tiles) == -(-T // bm)
        assert all(int(sw[i * bm:(i + 1) * bm].max()) == int(tiles[i]) for i in range(len(tiles)))
    sw1, order1 = nested_mlp_routing(w, sort=False)
    assert order1 is None and torch.equal(sw1, w)
    if sort_above is not None:
        assert launches == []  # the count kernel did not run


# ---------------------------------------------------------------------------------------------- bad input


def _args(gated=True):
    p = _params(torch.float32, gated=gated, biases=False)
    return randn(4, H), p["up_weight"], p["down_weight"], _widths("mixed", 4), p.get("gate_weight")


def test_bad_float_widths():
    x, up, down, w, gate = _args()
    with pytest.raises(TypeError, match="widths"):
        nested_mlp(x, up, down, w.float(), gate_weight=gate)


def test_bad_widths_above_range():
    x, up, down, w, gate = _args()
    w[1] = I + 1
    with pytest.raises(ValueError, match=r"widths must be in \[1, 200\]"):
        nested_mlp(x, up, down, w, gate_weight=gate)


def test_bad_widths_zero():
    x, up, down, w, gate = _args()
    w[0] = 0
    with pytest.raises(ValueError, match="widths"):
        nested_mlp(x, up, down, w, gate_weight=gate)


def test_bad_widths_shape():
    x, up, down, w, gate = _args()
    with pytest.raises(ValueError, match=r"widths must have shape x.shape\[:-1\]"):
        nested_mlp(x, up, down, w[:3], gate_weight=gate)


def test_bad_down_weight_shape():
    x, up, down, w, gate = _args()
    with pytest.raises(ValueError, match="down_weight must have shape"):
        nested_mlp(x, up, down[:, :-1], w, gate_weight=gate)


def test_bad_gate_weight_shape():
    x, up, down, w, gate = _args()
    with pytest.raises(ValueError, match="gate_weight must have up_weight's shape"):
        nested_mlp(x, up, down, w, gate_weight=gate[:-1])


def test_bad_hidden_size():
    x, up, down, w, gate = _args()
    with pytest.raises(ValueError, match=r"x.shape\[-1\]"):
        nested_mlp(x[:, :-1], up, down, w, gate_weight=gate)


def test_bad_bias_shape():
    x, up, down, w, gate = _args()
    with pytest.raises(ValueError, match="up_bias must have shape"):
        nested_mlp(x, up, down, w, gate_weight=gate, up_bias=randn(I - 1))


def test_bad_activation():
    x, up, down, w, gate = _args()
    with pytest.raises(ValueError, match="activation must be one of"):
        nested_mlp(x, up, down, w, gate_weight=gate, activation="swish")


def test_bad_weight_dtype():
    x, up, down, w, gate = _args()
    with pytest.raises(TypeError, match="down_weight must have x's dtype"):
        nested_mlp(x, up, down.half(), w, gate_weight=gate)


# ---------------------------------------------------------------------------------------------- GPU only


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need CUDA")
def test_cuda_graph_capture():
    """The forward has no host sync: it captures into a CUDA graph and replays with new widths."""
    p = _params(torch.bfloat16, gated=True, biases=False, inter=1024, hidden=256)
    x = randn(200, 256, dtype=torch.bfloat16)
    w = _widths("few", 200, 1024)
    args = (p["up_weight"].detach(), p["down_weight"].detach())
    with torch.no_grad():
        nested_mlp(x, *args, w, gate_weight=p["gate_weight"].detach())  # compile outside the capture
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = nested_mlp(x, *args, w, gate_weight=p["gate_weight"].detach())
        w.copy_(_widths("mixed", 200, 1024))
        g.replay()
        ref = nested_mlp_ref(x.double(), args[0].double(), args[1].double(), w,
                             gate_weight=p["gate_weight"].detach().double())
    assert_close(y, ref, torch.bfloat16)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("shape", [(1,), (16,), (2, 150)])
def test_eager_graph_cache(shape):
    """Eager inference calls replayed from cached graphs: the first call of a key runs the launches, the second
    captures, later ones replay. Every output equals the float64 reference and the launches' own output, stays what
    it was after later calls, and sees new widths, new inputs and weights updated in place; a new weight tensor is
    another graph."""
    graphs.clear()
    p = {k: v.detach() for k, v in _params(torch.bfloat16, gated=True, biases=True, inter=1024, hidden=256).items()}
    T = math.prod(shape)

    def call(x, widths, **over):
        kw = dict(p, **over)
        return nested_mlp(x, kw.pop("up_weight"), kw.pop("down_weight"), widths, check_widths=False, **kw)

    def ref(x, widths):
        pr = {k: v.double() for k, v in p.items()}
        return nested_mlp_ref(x.double(), pr.pop("up_weight"), pr.pop("down_weight"), widths, **pr)

    with torch.no_grad():
        outs = []
        for i, kind in enumerate(["mixed", "few", "one_per_width" if T <= 1024 else "mixed", "full", "one"]):
            x = randn(*shape, 256, dtype=torch.bfloat16)
            widths = _widths(kind, T, 1024).view(shape)
            y = call(x, widths)
            with graphs.graphs_enabled(False):
                assert_close(y, call(x, widths), torch.bfloat16, f"call {i} vs the launches")
            outs.append((y, y.clone(), ref(x, widths)))
            assert graphs.cached_graphs() == (1 if i >= 1 else 0)
        for i, (y, y_then, r) in enumerate(outs):
            assert torch.equal(y, y_then), f"call {i}'s output changed after later calls"
            assert_close(y, r, torch.bfloat16, f"call {i}")
        p["up_weight"].mul_(0.5)  # in place: the same graph reads the new values
        assert_close(call(x, widths), ref(x, widths), torch.bfloat16, "after an in-place update")
        assert graphs.cached_graphs() == 1
        p["down_weight"] = p["down_weight"] * 2  # a new tensor: another key, first sighting runs the launches
        for _ in range(3):
            assert_close(call(x, widths), ref(x, widths), torch.bfloat16, "a new weight tensor")
        assert graphs.cached_graphs() == 2
    graphs.clear()
    assert graphs.cached_graphs() == 0


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need CUDA")
def test_eager_graph_cache_not_for_autograd():
    """A call that records autograd never uses the cache (it saves tensors for backward)."""
    graphs.clear()
    p = _params(torch.bfloat16, gated=True, biases=False, inter=512, hidden=128)
    for _ in range(3):
        x = randn(16, 128, dtype=torch.bfloat16, requires_grad=True)
        _run(x, _widths("mixed", 16, 512), p, "silu", torch.bfloat16)
        for v in p.values():
            v.grad = None
    assert graphs.cached_graphs() == 0


@pytest.mark.skipif(not ON_GPU, reason="a real-size shape is too slow under the interpreter")
@pytest.mark.parametrize("T", [16, 1000, 1500])
def test_llama_size_bf16(T):
    p = _params(torch.bfloat16, gated=True, biases=False, inter=2816, hidden=1024)
    x = randn(T, 1024, dtype=torch.bfloat16, requires_grad=True)
    w = torch.tensor([2816, 2112, 1408, 704], device=DEVICE)[torch.randint(0, 4, (T,), device=DEVICE)]
    _run(x, w, p, "silu", torch.bfloat16)
