"""``distill_cross_entropy``: the elastic training loss of a sub-network in one pass over its logits.

``(1 - alpha) * CE(logits, target) + alpha * T^2 * KL(softmax(teacher / T) || softmax(logits / T))``, mean over
tokens (cross-entropy alone without a teacher). A language model's output layer makes ``[tokens, vocab]`` logits
(16K tokens x 49,152 entries = 1.6 GB in bf16 for SmolLM2); computing this loss with torch ops materialises several
float32 copies of them (the upcast, log-softmax of student and teacher, the KL terms) in the forward and as many in
the backward. Here one program per token reads its student and teacher rows twice (the softmax statistics, then the
loss terms) and writes the gradient in the logits' dtype during the forward, as Liger-Kernel's cross-entropy does;
the backward only scales the stored gradient, in place. Nothing of size ``vocab`` is kept in float32.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._runtime import INTERPRET, check_tensor, next_pow2, use_triton
from .reference import distill_cross_entropy_ref

# FLEXTRON_FUSED_LOSS=0 runs the plain-torch reference everywhere (to compare the two, or to rule the kernel out).
_ENABLED = os.environ.get("FLEXTRON_FUSED_LOSS", "1") != "0"
_GPU_BLOCK = 4096
_INTERPRET_BLOCK = 64  # small, so the tests' vocabularies span several blocks


@triton.jit
def _distill_ce_kernel(z_ptr, t_ptr, tgt_ptr, grad_ptr, loss_ptr, V, stride_z, stride_t, stride_g,
                       ce_w, kd_w, inv_temp, temp, grad_scale,
                       HAS_TEACHER: tl.constexpr, T_IS_ONE: tl.constexpr, WRITE_GRAD: tl.constexpr,
                       BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    t_row = t_ptr + row * stride_t
    offs = tl.arange(0, BLOCK)
    # pass 1: running max and sum of exponentials of z, z / T and t / T (online softmax, float32)
    m = float("-inf")
    s = 0.0
    m_q = float("-inf")
    s_q = 0.0
    m_t = float("-inf")
    s_t = 0.0
    for off in range(0, V, BLOCK):
        cols = off + offs
        mask = cols < V
        z = tl.load(z_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
        if HAS_TEACHER:
            t = tl.load(t_row + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
            mt_new = tl.maximum(m_t, tl.max(t, 0))
            s_t = s_t * tl.exp(m_t - mt_new) + tl.sum(tl.exp(t - mt_new), 0)
            m_t = mt_new
            if not T_IS_ONE:
                zq = z * inv_temp
                mq_new = tl.maximum(m_q, tl.max(zq, 0))
                s_q = s_q * tl.exp(m_q - mq_new) + tl.sum(tl.exp(zq - mq_new), 0)
                m_q = mq_new
    lse = m + tl.log(s)
    lse_t = 0.0
    lse_q = lse
    if HAS_TEACHER:
        lse_t = m_t + tl.log(s_t)
        if not T_IS_ONE:
            lse_q = m_q + tl.log(s_q)
    target = tl.load(tgt_ptr + row)
    valid = (target >= 0) & (target < V)  # an id outside the vocabulary makes the loss NaN, never a stray read
    ce = lse - tl.load(z_row + target, mask=valid, other=float("nan")).to(tl.float32)
    # pass 2: the KL terms and the gradient d loss_row / d z, scaled by grad_scale (1 / tokens)
    kl = 0.0
    for off in range(0, V, BLOCK):
        cols = off + offs
        mask = cols < V
        z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(z - lse)
        g = ce_w * (p - tl.where(cols == target, 1.0, 0.0))
        if HAS_TEACHER:
            lp_t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_temp - lse_t
            p_t = tl.exp(lp_t)
            if T_IS_ONE:
                lq = z - lse
                q = p
            else:
                lq = z * inv_temp - lse_q
                q = tl.exp(lq)
            kl += tl.sum(tl.where(mask, p_t * (lp_t - lq), 0.0), 0)
            g += kd_w * temp * (q - p_t)
        if WRITE_GRAD:
            tl.store(grad_ptr + row * stride_g + cols, (g * grad_scale).to(grad_ptr.dtype.element_ty), mask=mask)
    tl.store(loss_ptr + row, ce_w * ce + kd_w * temp * temp * kl)


class _DistillCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, target, teacher, alpha, temperature):
        n, v = z.shape
        has_t = teacher is not None and alpha > 0
        write_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(z) if write_grad else z
        rows = torch.empty(n, dtype=torch.float32, device=z.device)
        t = teacher if has_t else z
        block = min(next_pow2(v), _INTERPRET_BLOCK if INTERPRET else _GPU_BLOCK)
        ce_w, kd_w = (1.0 - alpha, alpha) if has_t else (1.0, 0.0)
        _distill_ce_kernel[(n,)](
            z, t, target, grad, rows, v, z.stride(0), t.stride(0), grad.stride(0),
            ce_w, kd_w, 1.0 / temperature, float(temperature), 1.0 / n,
            HAS_TEACHER=has_t, T_IS_ONE=temperature == 1, WRITE_GRAD=write_grad, BLOCK=block,
            num_warps=1 if INTERPRET else 8,
        )
        if write_grad:
            ctx.save_for_backward(grad)
        ctx.spent = False
        return rows.sum() / n

    @staticmethod
    def backward(ctx, dloss):
        # The stored gradient is scaled in place and handed on: no second logits-sized buffer at the peak of the
        # backward (2.4 GB in bf16 for SmolLM2 at 48 x 512 tokens), and the upstream scale applied in float32.
        if ctx.spent:
            raise RuntimeError("distill_cross_entropy: a second backward through the same loss (retain_graph=True) "
                               "is not supported: the first one used its stored gradient; compute the loss again")
        ctx.spent = True
        (grad,) = ctx.saved_tensors
        return grad.mul_(dloss), None, None, None, None


def distill_cross_entropy(logits: torch.Tensor, target: torch.Tensor, teacher: torch.Tensor | None = None,
                          alpha: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy blended with distillation from a teacher's logits, mean over tokens.

    Args:
        logits: ``[..., V]`` student logits, float32, float16 or bfloat16 (read as they are: under autocast, bf16).
        target: integer tensor of shape ``logits.shape[:-1]``, each in ``[0, V)`` (not checked, which would cost a
            device sync: on the kernel's path an id outside that range makes the loss NaN).
        teacher: ``None`` or the teacher's logits, ``logits``' shape (no gradient flows into them).
        alpha: weight of the distillation term in ``[0, 1]``; ignored without a teacher.
        temperature: ``T > 0`` of both softmaxes in the distillation term (scaled by ``T^2``).

    Returns the float32 scalar ``(1 - alpha) * CE + alpha * T^2 * KL(p_teacher || p_student)``, or ``CE`` without a
    teacher (``reference.distill_cross_entropy_ref``). Differentiable in ``logits``. On CUDA (and under the Triton
    interpreter) one kernel computes the loss and the gradient together, in ``logits``' dtype; elsewhere, and with
    ``FLEXTRON_FUSED_LOSS=0`` in the environment, the reference runs.
    """
    check_tensor("logits", logits, min_ndim=1)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be an integer torch.Tensor, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must have an integer dtype, got {target.dtype}")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"target must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, "
                         f"got {tuple(target.shape)}")
    if target.device != logits.device:
        raise ValueError(f"target must be on logits' device {logits.device}, got {target.device}")
    if teacher is not None:
        check_tensor("teacher", teacher)
        if teacher.shape != logits.shape:
            raise ValueError(f"teacher must have logits' shape {tuple(logits.shape)}, got {tuple(teacher.shape)}")
        if teacher.device != logits.device:
            raise ValueError(f"teacher must be on logits' device {logits.device}, got {teacher.device}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not _ENABLED or not use_triton(logits) or logits.numel() == 0 or torch.compiler.is_compiling():
        return distill_cross_entropy_ref(logits, target, teacher, alpha, temperature)
    v = logits.shape[-1]
    z = logits.reshape(-1, v)
    if z.stride(-1) != 1:
        z = z.contiguous()
    t = None
    if teacher is not None and alpha > 0:
        t = teacher.detach().reshape(-1, v)
        if t.stride(-1) != 1:
            t = t.contiguous()
    return _DistillCE.apply(z, target.reshape(-1).contiguous(), t, float(alpha), float(temperature))
