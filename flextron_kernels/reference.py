"""Plain-torch definitions of every op: the tests' oracle, the benchmarks' baseline, the CPU path.

Each function computes in the dtype it is given; tests call them on float64 copies of the inputs.
They are written for clarity, not speed (the masked forms do the full-width arithmetic).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")


def activation_ref(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(x)
    if activation == "gelu":
        return F.gelu(x)
    if activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if activation == "relu":
        return F.relu(x)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def sliced_linear_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, out_features: int | None = None
) -> torch.Tensor:
    """``y = x @ weight[:n, :k].T + bias[:n]`` with ``k = x.shape[-1]``, ``n = out_features or N``."""
    n = weight.shape[0] if out_features is None else out_features
    k = x.shape[-1]
    if (n, k) == tuple(weight.shape):  # the whole weight: no views to make (host time on every call)
        return F.linear(x, weight, bias)
    return F.linear(x, weight[:n, :k], None if bias is None else bias[:n])


def nested_mlp_ref(
    x: torch.Tensor,
    up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    widths: torch.Tensor,
    *,
    gate_weight: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    activation: str = "silu",
) -> torch.Tensor:
    """Per-token-width MLP: token t uses neurons ``[0, widths[t])`` of the shared weights.

    Written as the full-width MLP with the intermediate masked past each token's width, which is
    exactly the per-token prefix MLP (masked neurons contribute nothing to the down projection).
    """
    inter = up_weight.shape[0]
    h = F.linear(x, up_weight, up_bias)
    if gate_weight is not None:
        a = activation_ref(F.linear(x, gate_weight), activation) * h
    else:
        a = activation_ref(h, activation)
    drop = torch.arange(inter, device=x.device) >= widths.to(x.device).unsqueeze(-1)
    a = a.masked_fill(drop, 0.0)  # a dropped neuron contributes exactly nothing (an overflow there included)
    return F.linear(a, down_weight, down_bias)


def _heads_per_batch(num_heads, batch: int, hq: int, device) -> torch.Tensor:
    if num_heads is None:
        return torch.full((batch,), hq, dtype=torch.long, device=device)
    if isinstance(num_heads, int):
        return torch.full((batch,), num_heads, dtype=torch.long, device=device)
    return num_heads.to(device=device, dtype=torch.long)


def elastic_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads=None,
    *,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention with GQA expansion; query heads at or past ``num_heads[b]`` output zeros.

    ``q [B, Hq, S, D]``, ``k, v [B, Hkv, S, D]``; causal masks key ``j > i`` (queries and keys aligned at the end
    when their lengths differ).
    """
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    rep = hq // hkv
    kx = k.repeat_interleave(rep, dim=1)
    vx = v.repeat_interleave(rep, dim=1)
    s = torch.matmul(q, kx.transpose(-1, -2)) * scale
    if causal:
        i = torch.arange(sq, device=q.device).unsqueeze(1) + (sk - sq)
        j = torch.arange(sk, device=q.device).unsqueeze(0)
        s = s.masked_fill(j > i, float("-inf"))
    o = torch.matmul(torch.softmax(s, dim=-1), vx)
    heads = _heads_per_batch(num_heads, b, hq, q.device)
    keep = torch.arange(hq, device=q.device).unsqueeze(0) < heads.unsqueeze(1)
    # masked_fill, not a product: a head past the budget is exactly zero even if its inputs hold inf or NaN.
    return o.masked_fill(~keep[:, :, None, None], 0.0)


def elastic_attention_decode_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    num_heads=None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """One query token per sequence against its cached prefix ``[0, cache_lens[b])``.

    ``q [B, Hq, D]``, ``k_cache, v_cache [B, Hkv, S_max, D]``, ``cache_lens [B]`` (the new token's key and value
    already written at position ``cache_lens[b] - 1``). Heads at or past ``num_heads[b]`` output zeros.
    """
    b, hq, d = q.shape
    outs = []
    heads = _heads_per_batch(num_heads, b, hq, q.device)
    for i in range(b):
        n = int(cache_lens[i])
        o = elastic_attention_ref(
            q[i : i + 1, :, None, :], k_cache[i : i + 1, :, :n], v_cache[i : i + 1, :, :n],
            int(heads[i]), causal=False, scale=scale,
        )
        outs.append(o[:, :, 0, :])
    return torch.cat(outs, dim=0)


def distill_cross_entropy_ref(logits: torch.Tensor, target: torch.Tensor, teacher: torch.Tensor | None = None,
                              alpha: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """``(1 - alpha) * CE(logits, target) + alpha * T^2 * KL(softmax(teacher / T) || softmax(logits / T))``, mean
    over tokens; ``CE`` alone without a teacher or at ``alpha == 0``. float32 arithmetic (float64 for float64)."""
    v = logits.shape[-1]
    dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.reshape(-1, v).to(dt)
    tgt = target.reshape(-1)
    if teacher is None or alpha == 0:
        return F.cross_entropy(z, tgt)
    s = F.log_softmax(z, -1)
    s_t = s if temperature == 1 else F.log_softmax(z / temperature, -1)
    t = F.log_softmax(teacher.detach().reshape(-1, v).to(dt) / temperature, -1)
    kd = F.kl_div(s_t, t, log_target=True, reduction="batchmean") * temperature**2
    if alpha == 1:
        return kd
    return (1 - alpha) * F.nll_loss(s, tgt) + alpha * kd
