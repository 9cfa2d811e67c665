"""The ops as torch custom ops, for ``torch.compile``.

Traced by Dynamo, an op's own Python (plans, TMA descriptors, Triton launches) fails; while compiling, each op
calls its ``torch.ops.flextron.*_fwd`` instead: one opaque op whose fake implementation gives the output shapes,
with its backward (``*_bwd``) registered for autograd. The graph then holds no Triton internals, and a compiled
decode step can be captured whole (``mode="reduce-overhead"``). Eager calls keep the direct path (a custom op's
dispatch would add to their host time).

Outputs of ``nested_mlp_fwd``: ``y`` and what the backward needs: the sorted widths, the order (empty where the
batch is not sorted), and the pre-activations ``h``, ``g`` (empty unless ``training``; ``g`` only with a gate).
"""

import importlib

import torch

from ._runtime import cdiv
from .nested_mlp import launch as nm_launch
from .nested_mlp.plan import BUF_COLS, UNSORTED_MAX_T

# The op modules (the package exports each op's function by the module's name).
_sl = importlib.import_module(".sliced_linear", __package__)
_ea = importlib.import_module(".elastic_attention", __package__)
_ead = importlib.import_module(".elastic_attention_decode", __package__)


@torch.library.custom_op("flextron::nested_mlp_fwd", mutates_args=())
def nested_mlp_fwd(x: torch.Tensor, up_weight: torch.Tensor, down_weight: torch.Tensor, widths: torch.Tensor,
                   gate_weight: torch.Tensor | None, up_bias: torch.Tensor | None,
                   down_bias: torch.Tensor | None, act_id: int,
                   training: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y, (_, sw, order, h, g, _) = nm_launch.forward(x, up_weight, down_weight, gate_weight, up_bias, down_bias,
                                                   widths, act_id, training)
    empty = x.new_empty(0)
    if order is None:  # not sorted: the widths themselves, which a custom op may not return as a view
        sw, order = sw.clone(), torch.empty(0, dtype=torch.int64, device=x.device)
    return y, sw, order, h if h is not None else empty, g if g is not None else empty.clone()


@nested_mlp_fwd.register_fake
def _(x, up_weight, down_weight, widths, gate_weight, up_bias, down_bias, act_id, training):
    T = widths.numel()
    cols = cdiv(up_weight.shape[0], BUF_COLS) * BUF_COLS
    order = torch.empty((T,) if T > UNSORTED_MAX_T else (0,), dtype=torch.int64, device=x.device)
    h = x.new_empty((T, cols) if training else (0,))
    g = x.new_empty((T, cols) if training and gate_weight is not None else (0,))
    return x.new_empty(x.shape), widths.new_empty(T), order, h, g


@torch.library.custom_op("flextron::nested_mlp_bwd", mutates_args=())
def nested_mlp_bwd(dy: torch.Tensor, x: torch.Tensor, up_weight: torch.Tensor, down_weight: torch.Tensor,
                   gate_weight: torch.Tensor | None, up_bias: torch.Tensor | None, sw: torch.Tensor,
                   order: torch.Tensor, h: torch.Tensor, g: torch.Tensor, act_id: int, has_down_bias: bool,
                   need: list[bool]) -> list[torch.Tensor]:
    """Gradients of x, up_weight, down_weight, gate_weight, up_bias, down_bias: each an empty tensor where ``need``
    says it is not needed (or the input is absent)."""
    x2 = x.reshape(-1, x.shape[-1])
    plan = nm_launch.call_plan(x2, up_weight, down_weight, gate_weight)  # the forward's, made again
    grads = nm_launch.backward(dy, x2, up_weight, down_weight, gate_weight, up_bias, sw,
                               order if plan.sorted else None, h, g if gate_weight is not None else None, act_id,
                               plan, x.shape, has_down_bias, need)
    return [t if (t is not None and n) else dy.new_empty(0) for t, n in zip(grads, need)]


@nested_mlp_bwd.register_fake
def _(dy, x, up_weight, down_weight, gate_weight, up_bias, sw, order, h, g, act_id, has_down_bias, need):
    like = (x, up_weight, down_weight, gate_weight, up_bias, None)
    out = []
    for i, (t, n) in enumerate(zip(like, need)):
        if i == 5:  # down_bias: [H]
            out.append(dy.new_empty(x.shape[-1]) if n and has_down_bias else dy.new_empty(0))
        else:
            out.append(t.new_empty(t.shape) if n and t is not None else dy.new_empty(0))
    return out


def _nm_setup_context(ctx, inputs, output):
    x, up_weight, down_weight, widths, gate_weight, up_bias, down_bias, act_id, training = inputs
    _, sw, order, h, g = output
    ctx.save_for_backward(x, up_weight, down_weight, gate_weight, up_bias, sw, order, h, g)
    ctx.act_id, ctx.has_down_bias = act_id, down_bias is not None
    ctx.mark_non_differentiable(sw, order, h, g)


def _nm_backward(ctx, dy, *_):
    x, up_weight, down_weight, gate_weight, up_bias, sw, order, h, g = ctx.saved_tensors
    n = ctx.needs_input_grad
    need = [n[0], n[1], n[2], n[4], n[5], n[6]]
    grads = torch.ops.flextron.nested_mlp_bwd(dy.contiguous(), x, up_weight, down_weight, gate_weight, up_bias, sw,
                                              order, h, g, ctx.act_id, ctx.has_down_bias, need)
    dx, dup, ddown, dgate, dub, ddb = (t if k else None for t, k in zip(grads, need))
    return dx, dup, ddown, None, dgate, dub, ddb, None, None


nested_mlp_fwd.register_autograd(_nm_backward, setup_context=_nm_setup_context)


# ---------------------------------------------------------------------------------------------- sliced_linear


@torch.library.custom_op("flextron::sliced_linear_fwd", mutates_args=())
def sliced_linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    return _sl.forward(_sl.flatten(x), weight, bias, n).view(*x.shape[:-1], n)


@sliced_linear_fwd.register_fake
def _(x, weight, bias, n):
    return x.new_empty((*x.shape[:-1], n))


@torch.library.custom_op("flextron::sliced_linear_bwd", mutates_args=())
def sliced_linear_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, has_bias: bool, n: int,
                      need: list[bool]) -> list[torch.Tensor]:
    """Gradients of x, weight and bias: each an empty tensor where ``need`` says it is not needed."""
    grads = _sl.backward(dy, _sl.flatten(x), weight, n, x.shape, has_bias, need)
    return [t if (t is not None and k) else dy.new_empty(0) for t, k in zip(grads, need)]


@sliced_linear_bwd.register_fake
def _(dy, x, weight, has_bias, n, need):
    return [x.new_empty(x.shape) if need[0] else dy.new_empty(0),
            weight.new_empty(weight.shape) if need[1] else dy.new_empty(0),
            dy.new_empty(weight.shape[0]) if need[2] and has_bias else dy.new_empty(0)]


def _sl_setup_context(ctx, inputs, output):
    x, weight, bias, n = inputs
    ctx.save_for_backward(x, weight)
    ctx.n, ctx.has_bias = n, bias is not None


def _sl_backward(ctx, dy):
    x, weight = ctx.saved_tensors
    need = list(ctx.needs_input_grad[:3])
    grads = torch.ops.flextron.sliced_linear_bwd(dy, x, weight, ctx.has_bias, ctx.n, need)
    return (*(t if k else None for t, k in zip(grads, need)), None)


sliced_linear_fwd.register_autograd(_sl_backward, setup_context=_sl_setup_context)


# ---------------------------------------------------------------------------------------------- elastic_attention


@torch.library.custom_op("flextron::elastic_attention_fwd", mutates_args=())
def elastic_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: torch.Tensor, causal: bool,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o, lse)``: the output and each query row's log-sum-exp (the backward's)."""
    return _ea.forward(q, k, v, heads, causal, scale)


@elastic_attention_fwd.register_fake
def _(q, k, v, heads, causal, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("flextron::elastic_attention_bwd", mutates_args=())
def elastic_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                          lse: torch.Tensor, heads: torch.Tensor, causal: bool,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _ea.backward(do, q, k, v, o, lse, heads, causal, scale)


@elastic_attention_bwd.register_fake
def _(do, q, k, v, o, lse, heads, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _ea_setup_context(ctx, inputs, output):
    q, k, v, heads, causal, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, heads)
    ctx.causal, ctx.scale = causal, scale
    ctx.mark_non_differentiable(lse)


def _ea_backward(ctx, do, _dlse):
    q, k, v, o, lse, heads = ctx.saved_tensors
    dq, dk, dv = torch.ops.flextron.elastic_attention_bwd(do, q, k, v, o, lse, heads, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None


elastic_attention_fwd.register_autograd(_ea_backward, setup_context=_ea_setup_context)


@torch.library.custom_op("flextron::elastic_attention_decode_fwd", mutates_args=())
def elastic_attention_decode_fwd(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 cache_lens: torch.Tensor, heads: torch.Tensor, scale: float) -> torch.Tensor:
    """Inference only, as ``elastic_attention_decode``."""
    return _ead.decode(q, k_cache, v_cache, cache_lens, heads, scale)


@elastic_attention_decode_fwd.register_fake
def _(q, k_cache, v_cache, cache_lens, heads, scale):
    return q.new_empty(q.shape)
