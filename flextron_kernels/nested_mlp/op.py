"""``nested_mlp``: every token runs the MLP at its own width over one set of prefix-nested weights.

Token ``t`` with width ``w`` computes ``a = act(x Wg[:w]^T) * (x Wu[:w]^T + bu[:w])`` (or, ungated,
``a = act(x Wu[:w]^T + bu[:w])``) and ``y = a Wd[:, :w]^T + bd`` (``reference.nested_mlp_ref``).

Routing needs no host sync, so a decode step can be captured in a CUDA graph: tokens are sorted by width,
descending, on the device, and the kernels cut the sorted order into contiguous row tiles, each at its first
(widest) row's width. For every threshold ``v`` the tiles with width ``>= v`` number ``cdiv(#tokens >= v, BLOCK_M)``,
never more than a layout padded per width group (vLLM's ``moe_align_block_size``), so the MMA work is never larger,
the grid is static and the only metadata is the sort. Small batches (decode) skip the sort: one tile streams the
weight prefix up to the largest width once.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F

from .._runtime import INTERPRET, autocast_dtype, cast_to, check_same, check_tensor, setting, use_triton
from ..reference import ACTIVATIONS, activation_ref, nested_mlp_ref
from . import graphs, launch, plan

ACT_ID = {name: i for i, name in enumerate(ACTIVATIONS)}  # silu 0, gelu 1, gelu_tanh 2, relu 3

# Eager calls that record autograd on a GPU with at most this many tokens run the MLP as torch ops at full width,
# each token's neurons past its width zeroed (:func:`_torch_path`: cuBLAS, autograd's own backward). There the call
# is bound by host time: on an H100 the kernels' eager forward+backward of 256 tokens (Llama-2-7B MLP) took
# 1.45-1.72 ms against 0.48 for the dense MLP, 0.41-0.51 ms from a CUDA graph. Not under graph capture or
# torch.compile (the kernels' GPU time is the lower one), nor inside ``plan.override`` (kernel tests and sweeps).
EAGER_TRAINING_MAX_TOKENS = 256
TRAINING_PATHS = ("kernels", "torch")
_forced_training: str | None = None


def training_path(path: str) -> AbstractContextManager[None]:
    """Inside the block every ``nested_mlp`` call that records autograd takes ``path`` in place of the rule above:
    ``"kernels"`` (the Triton forward and backward) or ``"torch"`` (:func:`_torch_path`). Tests, benchmarks."""
    if path not in TRAINING_PATHS:
        raise ValueError(f"path must be one of {TRAINING_PATHS}, got {path!r}")
    return setting(globals(), "_forced_training", path)


def _torch_training(x: torch.Tensor) -> bool:
    """Whether a call on ``x`` that records autograd (eager, not compiling) runs as torch ops."""
    if _forced_training is not None:
        return _forced_training == "torch"
    return (x.is_cuda and not INTERPRET and x.numel() // x.shape[-1] <= EAGER_TRAINING_MAX_TOKENS
            and not plan.overridden() and not torch.cuda.is_current_stream_capturing())


_COLUMNS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _torch_path(x, up_weight, down_weight, widths, gate_weight, up_bias, down_bias, activation) -> torch.Tensor:
    """The full-width MLP, each token's neurons past its width zeroed: ``nested_mlp_ref``'s computation in two
    launches fewer (the column indices made once per width and device; a gated product masked in place: autograd's
    ``mul`` keeps its inputs, not its output, while ``relu``'s backward reads its output, so ungated ones copy)."""
    inter = up_weight.shape[0]
    cols = _COLUMNS.get((inter, x.device))
    if cols is None:
        cols = torch.arange(inter, device=x.device)
        if not (x.is_cuda and torch.cuda.is_current_stream_capturing()):  # captured, it holds values only on replay
            _COLUMNS[(inter, x.device)] = cols
    drop = cols >= widths.unsqueeze(-1)
    h = F.linear(x, up_weight, up_bias)
    if gate_weight is not None:
        a = (activation_ref(F.linear(x, gate_weight), activation) * h).masked_fill_(drop, 0.0)
    else:
        a = activation_ref(h, activation).masked_fill(drop, 0.0)
    return F.linear(a, down_weight, down_bias)


class _NestedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, up_weight, down_weight, gate_weight, up_bias, down_bias, widths, act_id):
        y, (x2, sw, order, h, g, plan) = launch.forward(
            x, up_weight, down_weight, gate_weight, up_bias, down_bias, widths, act_id, True)
        ctx.save_for_backward(x2, up_weight, down_weight, gate_weight, up_bias, sw, order, h, g)
        ctx.act_id, ctx.plan, ctx.x_shape = act_id, plan, x.shape
        ctx.has_down_bias = down_bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, up_w, down_w, gate_w, up_b, sw, order, h, g = ctx.saved_tensors
        grads = launch.backward(dy, x2, up_w, down_w, gate_w, up_b, sw, order, h, g, ctx.act_id, ctx.plan,
                                ctx.x_shape, ctx.has_down_bias, ctx.needs_input_grad[:6])
        return (*grads, None, None)


def _check(x, up_weight, down_weight, widths, gate_weight, up_bias, down_bias, activation, same_dtype=True) -> int:
    if activation not in ACT_ID:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    check_tensor("x", x, min_ndim=1)
    check_tensor("up_weight", up_weight, ndim=2)
    check_same("up_weight", up_weight, "x", x, same_dtype)
    inter, H = up_weight.shape
    if x.shape[-1] != H:
        raise ValueError(f"x.shape[-1] must equal up_weight.shape[1] = {H}, got {x.shape[-1]}")
    check_tensor("down_weight", down_weight, ndim=2)
    check_same("down_weight", down_weight, "x", x, same_dtype)
    if tuple(down_weight.shape) != (H, inter):
        raise ValueError(f"down_weight must have shape {(H, inter)} (up_weight's transposed), "
                         f"got {tuple(down_weight.shape)}")
    if gate_weight is not None:
        check_tensor("gate_weight", gate_weight, ndim=2)
        check_same("gate_weight", gate_weight, "x", x, same_dtype)
        if gate_weight.shape != up_weight.shape:
            raise ValueError(f"gate_weight must have up_weight's shape {(inter, H)}, got {tuple(gate_weight.shape)}")
    for name, b, n in (("up_bias", up_bias, inter), ("down_bias", down_bias, H)):
        if b is not None:
            check_tensor(name, b, ndim=1)
            check_same(name, b, "x", x, same_dtype)
            if b.shape[0] != n:
                raise ValueError(f"{name} must have shape ({n},), got {tuple(b.shape)}")
    if not isinstance(widths, torch.Tensor):
        raise TypeError(f"widths must be an integer torch.Tensor, got {type(widths).__name__}")
    if widths.is_floating_point() or widths.is_complex() or widths.dtype == torch.bool:
        raise TypeError(f"widths must have an integer dtype, got {widths.dtype}")
    if tuple(widths.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"widths must have shape x.shape[:-1] = {tuple(x.shape[:-1])}, got {tuple(widths.shape)}")
    if widths.device != x.device:
        raise ValueError(f"widths must be on x's device {x.device}, got {widths.device}")
    return inter


def nested_mlp(
    x: torch.Tensor,
    up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    widths: torch.Tensor,
    *,
    gate_weight: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    activation: str = "silu",
    check_widths: bool = True,
) -> torch.Tensor:
    """Per-token-width MLP over one set of prefix-nested weights (no weight copies).

    Args:
        x: ``[..., H]``.
        up_weight, gate_weight: ``[I, H]``; down_weight: ``[H, I]``; up_bias ``[I]``, down_bias ``[H]``.
        widths: integer tensor of shape ``x.shape[:-1]``: the neurons each token uses, ``1 <= w <= I``.
        activation: ``"silu"``, ``"gelu"``, ``"gelu_tanh"`` (GPT-2) or ``"relu"``.
        check_widths: check the range of ``widths`` (one host synchronisation). It is skipped on its own
            while a CUDA graph is being captured or ``torch.compile`` traces the call; pass False to skip it in
            eager decode loops. Unchecked
            out-of-range widths are clamped to ``[0, I]`` in the kernels (never read past a weight).

    Returns ``[..., H]``: ``a = act(x Wg[:w]^T) * (x Wu[:w]^T + bu[:w])`` with a gate, else
    ``a = act(x Wu[:w]^T + bu[:w])``; ``y = a Wd[:, :w]^T + bd`` (``reference.nested_mlp_ref``).
    Differentiable in ``x`` and every weight and bias; their gradients have full shapes, exactly zero
    outside the neurons any token used. Tokens are sorted by width on the device, with no host sync.

    Eager calls that record autograd on a GPU with at most :data:`EAGER_TRAINING_MAX_TOKENS` tokens run as torch
    ops instead (the full-width MLP with each token's neurons past its width zeroed; :func:`training_path`).
    """
    amp = autocast_dtype(x)
    inter = _check(x, up_weight, down_weight, widths, gate_weight, up_bias, down_bias, activation, amp is None)
    used = inter
    compiling = torch.compiler.is_compiling()
    if (check_widths and widths.numel() > 0 and not compiling
            and not (widths.is_cuda and torch.cuda.is_current_stream_capturing())):
        lo, hi = (int(v) for v in torch.aminmax(widths))
        if lo < 1 or hi > inter:
            raise ValueError(f"widths must be in [1, {inter}] (up_weight.shape[0]), got values in [{lo}, {hi}]")
        used = hi
    if amp is not None:  # as F.linear under autocast; only the neurons this call can read are cast
        x, up_weight, down_weight, gate_weight, up_bias = cast_to(
            amp, x, up_weight[:used], down_weight[:, :used], None if gate_weight is None else gate_weight[:used],
            None if up_bias is None else up_bias[:used])
        (down_bias,) = cast_to(amp, down_bias)
    if not use_triton(x) or x.numel() == 0:
        return nested_mlp_ref(x, up_weight, down_weight, widths, gate_weight=gate_weight, up_bias=up_bias,
                              down_bias=down_bias, activation=activation)
    tensors = (x, up_weight, down_weight, gate_weight, up_bias, down_bias)
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if compiling:  # one opaque custom op in the traced graph (_ops), with its backward registered
        return torch.ops.flextron.nested_mlp_fwd(x, up_weight, down_weight, widths, gate_weight, up_bias, down_bias,
                                                 ACT_ID[activation], training)[0]
    if training:
        if _torch_training(x):
            return _torch_path(x, up_weight, down_weight, widths, gate_weight, up_bias, down_bias, activation)
        return _NestedMLP.apply(*tensors, widths, ACT_ID[activation])
    # Inference: no autograd node, no saved pre-activations; on CUDA, replayed from a cached graph where this exact
    # call was seen before (graphs.py: one graph launch instead of three Triton launches).
    if graphs.serves(x):
        return graphs.call(launch.forward, *tensors, widths, ACT_ID[activation])
    return launch.forward(*tensors, widths, ACT_ID[activation], False)[0]
