"""Routers: target encoding, soft masks equal prefix subnets, training runs, set_budget (static, adaptive,
guarantee), save/load with the model, and the bad-input errors."""

from __future__ import annotations

import pytest
import torch

from flextron import ElasticSpace, FlextronModel
from flextron.budget import attach_router, attach_table, record_choices, routing
from flextron.router import (
    DynamicRouter,
    RouterTrainConfig,
    StaticRouter,
    _Sampler,
    encode_target,
    routed,
    train_routers,
)
from flextron.space import Subnet
from flextron.surrogate import Surrogate
from tests.model_utils import tiny_model, tokens
from tests.test_latency import SPACE, synthetic


def _choices(fm):
    return ([fm.mlp_choices(i) for i in range(fm.num_layers)], [fm.head_choices(i) for i in range(fm.num_layers)])


@pytest.fixture(scope="module")
def routed_fm() -> FlextronModel:
    """A tiny Llama with a synthetic table and briefly trained static and dynamic routers."""
    torch.manual_seed(0)
    fm = FlextronModel.from_hf(tiny_model("llama"), SPACE)
    table = synthetic(fm)
    attach_table(fm, table)
    windows = tokens(8, 10, seed=3)
    cfg = RouterTrainConfig(sm_steps=3, sm_warmup=1, joint_steps=2, batch_size=2, sm_threshold=10.0, lr_model=1e-4)
    for r in (StaticRouter(*_choices(fm), hidden=8), DynamicRouter(*_choices(fm), hidden_size=48, hidden=8)):
        log = train_routers(fm, r, table, windows, cfg)
        assert log[-1]["phase"] == "joint" and all(torch.isfinite(torch.tensor(x["lm_loss"])) for x in log)
        attach_router(fm, r)
    return fm


def test_encode_target_interpolates_neighbouring_anchors():
    e = encode_target(torch.tensor([0.2, 0.55, 1.0, 0.05]))
    assert torch.allclose(e.sum(-1), torch.ones(4))
    assert e[0, 0] == 1 and e[2, -1] == 1 and e[3, 0] == 1  # below the first anchor: clamped
    assert torch.allclose(e[1, 3:5], torch.tensor([0.5, 0.5]))


@pytest.mark.parametrize("family", ["llama_gqa", "gpt2"])
def test_one_hot_soft_masks_equal_the_prefix_subnet(family):
    fm = FlextronModel.from_hf(tiny_model(family), ElasticSpace(mlp=(0.5, 1.0)))
    r = StaticRouter(*_choices(fm), hidden=4)
    ids = tokens(2, 7)
    # one-hot logits, huge: the Gumbel sample is the argmax
    pick_m = [len(c) - 1 - (i % 2) for i, c in enumerate(r.mlp_choices)]
    pick_h = [0 for _ in r.head_choices]
    big = lambda c, j: torch.nn.functional.one_hot(torch.tensor([j, j]), len(c)).float() * 1e4
    statics = ([big(c, j) for c, j in zip(r.mlp_choices, pick_m)], [big(c, j) for c, j in zip(r.head_choices, pick_h)])
    s = _Sampler(r, fm, encode_target(torch.tensor([0.5, 0.5])), tau=1.0, hard=True, detach_masks=True,
                 statics=statics)
    with torch.no_grad(), routed(fm, s):
        got = fm(input_ids=ids, use_cache=False).logits
    fm.set_subnet(Subnet(mlp=[c[j] for c, j in zip(r.mlp_choices, pick_m)],
                         heads=[c[j] for c, j in zip(r.head_choices, pick_h)]))
    with torch.no_grad():
        want = fm(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_surrogate_learns_and_gates():
    torch.manual_seed(0)
    sm = Surrogate(4, hidden=16)
    opt = torch.optim.Adam(sm.parameters(), lr=1e-2)
    assert not sm.trusted(0.05)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: OpenMP threads only contend (seconds on a loaded 2-core box)
    try:
        for _ in range(60):
            p = torch.rand(64, 4)
            sm.observe(p, 3.0 + p[:, 0] - 0.5 * p[:, 1], opt, steps=3)
    finally:
        torch.set_num_threads(threads)
    assert sm.trusted(0.05)


def test_static_budget_and_guarantee(routed_fm):
    fm = routed_fm
    table = routing(fm).table
    for target in (0.5, 0.7, 0.9):
        s = fm.set_budget(target)
        fm.check_subnet(s)
        assert fm.subnet in (s, None)
        g = fm.set_budget(target, guarantee=True)
        assert table.predict_fraction(g) <= target + 1e-9
        assert all(a <= b for a, b in zip(g.mlp + g.heads, s.mlp + s.heads))  # only shrinks the router's choice
    with torch.no_grad():
        assert fm(input_ids=tokens(1, 6)).logits.shape == (1, 6, 96)
    fm.set_budget(None)
    assert fm.subnet is None


def test_adaptive_budget_keeps_head_choice_for_decode(routed_fm):
    fm = routed_fm
    cap = fm.set_budget(0.6, adaptive=True, guarantee=True)
    assert routing(fm).table.predict_fraction(cap) <= 0.6 + 1e-9
    with record_choices(fm) as counts, torch.no_grad():
        out = fm.generate(tokens(2, 5), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 8)
    # heads decided once per sequence (at prefill), MLP widths once per token (5 prompt + 2 decode steps)
    assert all(int(c.sum()) == 2 for c in counts["heads"])
    assert all(int(c.sum()) == 2 * 7 for c in counts["mlp"])
    # an adaptive budget's output equals running its recorded per-token widths by hand
    fm.set_budget(0.8, adaptive=True)
    ids = tokens(1, 6)
    widths, hook = [], []
    for m in fm.mlp_blocks:
        hook.append(m.register_forward_pre_hook(lambda mod, a, k: widths.append(k["widths"].clone()),
                                                with_kwargs=True))
    with torch.no_grad():
        got = fm(input_ids=ids).logits
    for h in hook:
        h.remove()
    fm.set_budget(None)
    assert torch.isfinite(got).all() and all(w.shape == (1, 6) for w in widths)


def test_save_load_routers_and_table(routed_fm, tmp_path):
    fm = routed_fm
    fm.save_pretrained(tmp_path / "ckpt")
    back = FlextronModel.from_pretrained(tmp_path / "ckpt")
    r0, r1 = routing(fm), routing(back)
    assert r1.table.to_dict() == r0.table.to_dict()
    for t in (0.4, 0.75, 1.0):
        assert r1.static.choose(t) == r0.static.choose(t)
    for a, b in zip(r0.dynamic.state_dict().values(), r1.dynamic.state_dict().values()):
        assert torch.equal(a.cpu(), b)
    assert back.set_budget(0.7) == fm.set_budget(0.7)
    fm.set_budget(None)


def test_calibrated_adaptive_budget(routed_fm, tmp_path):
    """calibrate_adaptive measures the raw dynamic router's realised latency per input; set_budget(adaptive=True)
    then feeds the input whose realised fraction is nearest the target, and the measured fraction of the budget
    on the same text is that one. The curve is saved with the model; an active budget survives calibration."""
    from flextron.budget import adaptive_fraction, calibrate_adaptive

    fm = routed_fm
    r = routing(fm)
    batches = [tokens(2, 8, seed=s) for s in (11, 12)]
    fm.set_budget(0.9)  # a static budget is active: restored afterwards
    grid = [0.2, 0.35, 0.5, 0.65, 0.8, 1.0]
    curve = fm.calibrate_adaptive(batches, grid=grid)
    assert [t for t, _ in curve] == grid and r.dynamic.calibration == curve
    assert r.budget["target"] == 0.9 and not r.budget["adaptive"] and not r.hooks
    for target in (0.45, 0.7, 0.95):
        fm.set_budget(target, adaptive=True)
        t_in = r.budget["router_input"]
        want = min(curve, key=lambda p: (abs(p[1] - target), p[1]))
        assert t_in == want[0]
        with record_choices(fm) as counts, torch.no_grad():
            for ids in batches:
                fm(input_ids=ids, use_cache=False)
        assert adaptive_fraction(fm, counts) == pytest.approx(want[1], abs=1e-9)
    fm.save_pretrained(tmp_path / "ckpt")
    back = FlextronModel.from_pretrained(tmp_path / "ckpt")
    assert routing(back).dynamic.calibration == curve
    fm.set_budget(None)
    with pytest.raises(ValueError, match="batches"):
        calibrate_adaptive(fm, [])
    with pytest.raises(ValueError, match="target"):
        calibrate_adaptive(fm, batches, grid=[0.5, 1.5])
    assert r.dynamic.calibration == curve  # a refused call keeps the curve
    table, r.table = r.table, None
    try:
        with pytest.raises(ValueError, match="latency table"):
            calibrate_adaptive(fm, batches)
    finally:
        r.table = table
    r.dynamic.calibration = None  # the module's other tests use the raw router


def test_routers_not_matching_the_space_are_refused(routed_fm):
    other = FlextronModel.from_hf(tiny_model("llama"), ElasticSpace(mlp=(0.5, 1.0)))
    with pytest.raises(ValueError, match="routers do not match the model's space: layer 0 mlp"):
        attach_router(other, routing(routed_fm).static)


def test_set_budget_target_outside_unit_interval(routed_fm):
    for bad in (0.0, 1.01, -1, "0.5", True):
        with pytest.raises(ValueError, match=r"target must be a latency fraction in \(0, 1\]"):
            routed_fm.set_budget(bad)


def test_static_choice_read_through_the_table_is_nearest(routed_fm):
    from flextron.budget import static_subnet

    r = routing(routed_fm)
    for t in (0.45, 0.6, 0.85):
        calibrated = r.table.predict_fraction(static_subnet(r.static, t, r.table))
        raw = r.table.predict_fraction(r.static.choose(t))
        assert abs(calibrated - t) <= abs(raw - t) + 1e-12
