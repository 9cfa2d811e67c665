"""Which path a ``nested_mlp`` call that records autograd takes: the Triton kernels, or torch ops (the full-width MLP
with each token's neurons past its width zeroed) for small eager calls on a GPU. Both give the float64 reference's
outputs and gradients; the rule is checked where it applies (CUDA), the forced paths everywhere."""

import pytest
import torch

from flextron_kernels import nested_mlp
from flextron_kernels.nested_mlp import graphs, launch, op
from flextron_kernels.nested_mlp import plan as nm_plan
from flextron_kernels.reference import nested_mlp_ref
from tests.utils import DEVICE, ON_GPU, assert_close, randn

H, I = 48, 200


def _case(T, dtype=torch.float32, seed=0, style="llama"):
    """Llama's gated MLP, or GPT-2's: ungated, both biases (its activation is gelu_tanh, or relu: see ``ACT``)."""
    g = torch.Generator().manual_seed(seed)
    widths = torch.randint(1, I + 1, (T,), generator=g).to(DEVICE)
    x = randn(T, H, dtype=dtype, requires_grad=True)
    params = {"up_weight": randn(I, H, dtype=dtype, scale=H ** -0.5, requires_grad=True),
              "down_weight": randn(H, I, dtype=dtype, scale=I ** -0.5, requires_grad=True)}
    if style == "llama":
        params["gate_weight"] = randn(I, H, dtype=dtype, scale=H ** -0.5, requires_grad=True)
    else:
        params["up_bias"] = randn(I, dtype=dtype, scale=0.5, requires_grad=True)
        params["down_bias"] = randn(H, dtype=dtype, scale=0.5, requires_grad=True)
    return x, widths, params


# relu: an ungated activation whose backward reads its output (the torch path must not mask that in place).
ACT = {"llama": "silu", "gpt2": "gelu_tanh", "relu": "relu"}


def _launches(monkeypatch) -> list:
    seen = []
    real = launch.forward
    monkeypatch.setattr(launch, "forward", lambda *a, **k: seen.append(1) or real(*a, **k))
    return seen


def _fwd_bwd(x, widths, params, dy, activation="silu"):
    y = nested_mlp(x, params["up_weight"], params["down_weight"], widths, activation=activation, check_widths=False,
                   **{k: v for k, v in params.items() if k not in ("up_weight", "down_weight")})
    y.backward(dy)
    grads = [x.grad] + [p.grad for p in params.values()]
    for t in [x, *params.values()]:
        t.grad = None
    return y.detach(), grads


@pytest.mark.parametrize("style", ["llama", "gpt2", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forced_paths_match_the_reference(dtype, style, monkeypatch):
    x, widths, params = _case(37, dtype, style=style)
    dy = randn(37, H, dtype=dtype)
    launched = _launches(monkeypatch)
    got = {}
    for path in op.TRAINING_PATHS:
        launched.clear()
        with op.training_path(path):
            got[path] = _fwd_bwd(x, widths, params, dy, ACT[style])
        assert bool(launched) == (path == "kernels"), path
    xr = x.detach().double().requires_grad_()
    pr = {k: v.detach().double().requires_grad_() for k, v in params.items()}
    yr = nested_mlp_ref(xr, pr["up_weight"], pr["down_weight"], widths, activation=ACT[style],
                        **{k: v for k, v in pr.items() if k not in ("up_weight", "down_weight")})
    yr.backward(dy.double())
    for path, (y, grads) in got.items():
        assert_close(y, yr, dtype, f"y ({path})")
        for name, g, r in zip(["x", *params], grads, [xr.grad, *(p.grad for p in pr.values())]):
            assert_close(g, r, dtype, f"d{name} ({path})", 2.0)
        # exactly zero past the widest token's width
        wmax = int(widths.max())
        assert torch.count_nonzero(grads[1][wmax:]) == 0 and torch.count_nonzero(grads[2][:, wmax:]) == 0


def test_training_path_bad_value():
    with pytest.raises(ValueError, match="path must be one of"):
        with op.training_path("cublas"):
            pass


def test_no_grad_calls_keep_the_kernels(monkeypatch):
    """The forced torch path is about calls that record autograd: inference calls launch the kernels."""
    x, widths, params = _case(16)
    launched = _launches(monkeypatch)
    with op.training_path("torch"), graphs.graphs_enabled(False), torch.no_grad():
        nested_mlp(x, params["up_weight"], params["down_weight"], widths, gate_weight=params["gate_weight"])
    assert launched


@pytest.mark.skipif(not ON_GPU, reason="the rule applies to CUDA tensors (the interpreter always runs the kernels)")
def test_rule_on_a_gpu(monkeypatch):
    """Eager training calls up to EAGER_TRAINING_MAX_TOKENS tokens run as torch ops; larger ones, calls inside
    plan.override and calls under graph capture launch the kernels."""
    launched = _launches(monkeypatch)
    n = op.EAGER_TRAINING_MAX_TOKENS
    for T, kernels in ((1, False), (n, False), (n + 1, True)):
        x, widths, params = _case(T)
        launched.clear()
        _fwd_bwd(x, widths, params, randn(T, H))
        assert bool(launched) == kernels, T
    x, widths, params = _case(8)
    launched.clear()
    with nm_plan.override(lambda p: p):
        _fwd_bwd(x, widths, params, randn(8, H))
    assert launched
    # under capture: warm up (compiles the kernels), then capture one forward+backward
    dy = randn(8, H)
    with op.training_path("kernels"):
        _fwd_bwd(x, widths, params, dy)
    launched.clear()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s), torch.cuda.graph(graph, stream=s):
        y = nested_mlp(x, params["up_weight"], params["down_weight"], widths, gate_weight=params["gate_weight"],
                       check_widths=False)
        torch.autograd.grad(y, [x], dy)
    torch.cuda.current_stream().wait_stream(s)
    assert launched
