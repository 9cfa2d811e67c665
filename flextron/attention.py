"""The elastic attention block: a Hugging Face attention module running on a prefix of its heads.

It adopts the HF module's own children (``q_proj``/``k_proj``/``v_proj``/``o_proj`` of Llama, Mistral and Qwen2;
the fused ``c_attn`` and ``c_proj`` of GPT-2), so state dicts map 1:1, and it takes the same call as the HF module
(position embeddings, the mask HF builds, the cache), so ``generate()`` and its KV cache work unchanged. With
``heads = h`` it projects q to ``h`` heads and k/v to ``h / group`` KV heads (GQA keeps whole groups), runs
attention on those heads only, and feeds the ``h * head_dim`` prefix of the o-projection's input. Only the kept
KV heads reach the cache: HF's caches store whatever k/v they are given.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import StaticLayer

from flextron_kernels import elastic_attention, elastic_attention_decode
from flextron_kernels._runtime import setting, use_triton
from flextron_kernels.elastic_attention import sdpa_serves

from . import layers
from .layers import prefix_linear


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """RoPE as Llama/Mistral/Qwen2 apply it (``cos``/``sin`` ``[B, S, D]``); it acts within each head."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


_NO_PADDING = False


def no_padding() -> AbstractContextManager[None]:
    """Tell attention that the masks transformers builds in this block are plain causal masks (no padding).

    While a CUDA graph is being captured transformers materialises the causal mask it would otherwise skip (it
    cannot look at the values then), which would send attention to SDPA; inside this block the mask is dropped
    and the Triton kernels (causal by construction) run. Only for inputs without padding: the caller vouches."""
    return setting(globals(), "_NO_PADDING", True)


def _kernel_fits(q: torch.Tensor, attention_mask, dropout: float) -> bool:
    """The Triton kernels take causal attention with no extra mask and head dims that are powers of two in
    [16, 256]; anything else (padding masks, sliding windows that bind, dropout, tiny heads) runs SDPA."""
    d = q.shape[-1]
    return use_triton(q) and attention_mask is None and dropout == 0.0 and 16 <= d <= 256 and d & (d - 1) == 0


def attention_core(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor | None, *,
    scaling: float, dropout: float = 0.0, head_budgets: torch.Tensor | None = None, fixed_cache: bool = False,
    head_drop: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal softmax attention on the kept heads: ``q [B, h, Sq, D]``, ``k, v [B, h/g, Sk, D]`` -> ``[B, Sq, h, D]``.

    ``attention_mask`` is what HF built for the model (``None``, a boolean mask where True attends, or an additive
    float mask, broadcast over heads). ``head_budgets`` (``[B]`` query-head counts, multiples of the group size,
    at most ``h``) gives each sequence its own head count; heads past it come out as zeros.

    This is the one place attention runs. Where the kernels apply (CUDA, or the interpreter; no padding mask; head
    dim a power of two >= 16), prefill runs ``elastic_attention`` (SDPA on a GPU when every sequence keeps the same
    heads, the Triton kernel for per-sequence budgets), and a one-token step against the cache runs SDPA as HF does
    or, with per-sequence budgets, ``elastic_attention_decode``; all over the GQA heads as they are (no K/V
    expansion), heads past a sequence's budget skipped. Otherwise SDPA runs on the head prefix with HF's mask.

    ``attention_mask=None`` means what it means to HF's SDPA integration: one query sees every key; several
    queries start at key 0 (causal, upper-left), which transformers passes only when the queries are all the keys
    or a prefill into a static cache's fixed-size buffer (keys past the queries are empty slots). ``fixed_cache``:
    the keys come from such a buffer (HF's static caches), so a mask is never dropped under :func:`no_padding`.
    ``head_drop`` (``[B, h, 1, 1]`` booleans, True past each sequence's budget; with ``head_budgets``): SDPA runs on
    every head and these come out as zeros, in place of the kernels (the masked decode of
    :data:`flextron.layers.BUDGET_DECODE`).
    """
    b, h, sq, _ = q.shape
    sk = k.shape[2]
    if _NO_PADDING and not fixed_cache:
        attention_mask = None  # the caller vouches: no padding, keys end at the last query (dynamic caches)
    elif attention_mask is None and 1 < sq < sk:
        k, v, sk = k[:, :, :sq], v[:, :, :sq], sq  # upper-left causal: query i sees keys 0..i only
    if head_budgets is None and attention_mask is None and sk >= sq and sdpa_serves(q, k, True):
        # HF's own call (SDPA, the backend torch picks, GQA without expanding K/V): every sequence keeps the same
        # heads, and the causal alignment is SDPA's (queries == keys) or moot (one query).
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=sq > 1,
                                           enable_gqa=h != k.shape[1])
        return o.transpose(1, 2)
    if head_drop is None and _kernel_fits(q, attention_mask, dropout) and sk >= sq:
        if sq == 1 and (head_budgets is not None or not sdpa_serves(q, k, True)):
            lens = torch.full((b,), sk, dtype=torch.int32, device=q.device)
            o = elastic_attention_decode(q[:, :, 0], k, v, lens, head_budgets, scale=scaling, validate=False)
            return o.unsqueeze(1)
        o = elastic_attention(q, k, v, head_budgets, causal=True, scale=scaling, validate=False)
        return o.transpose(1, 2)
    is_causal = False
    if attention_mask is None and sq > 1:
        if sq == sk:
            is_causal = True
        else:  # a chunk of queries after cached keys: causal, aligned at the end
            i = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
            attention_mask = torch.arange(sk, device=q.device)[None, :] <= i
    elif attention_mask is not None and attention_mask.shape[-1] != sk:
        attention_mask = attention_mask[..., :sk]
    # GQA as transformers' SDPA integration does it (``use_gqa_in_sdpa``, ``pack_gqa``): SDPA's own without a mask
    # (no copy of the cache per layer and step); with one (CUDA's fused kernels refuse GQA with a mask), a single
    # query's heads packed as ``rep`` queries of their KV head, so no copy either; K/V expanded to the query heads
    # otherwise.
    rep = h // k.shape[1]
    gqa = rep > 1 and attention_mask is None
    packed = rep > 1 and not gqa and sq == 1 and _packable(attention_mask, b, h) and not torch.compiler.is_compiling()
    if packed:
        q = q.reshape(b, h // rep, rep, q.shape[-1])
        if attention_mask.shape[1] != 1:  # a mask per query head: [B, Hq, 1, Sk] -> [B, Hkv, rep, Sk]
            attention_mask = attention_mask.reshape(attention_mask.shape[0], h // rep, rep, attention_mask.shape[-1])
    elif rep > 1 and not gqa:
        k, v = _repeat_kv(k, rep), _repeat_kv(v, rep)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
                                       is_causal=is_causal, enable_gqa=gqa)
    if packed:
        o = o.reshape(b, h, 1, o.shape[-1])
    if head_budgets is not None:
        if head_drop is None:
            head_drop = (torch.arange(h, device=q.device)[None, :] >= head_budgets[:, None])[:, :, None, None]
        # In place outside autograd (SDPA's fresh output: one launch fewer per layer and step); its backward reads
        # that output, so a call that records autograd keeps it.
        o = o.masked_fill(head_drop, 0.0) if o.requires_grad else o.masked_fill_(head_drop, 0.0)
    return o.transpose(1, 2)


def _repeat_kv(x: torch.Tensor, rep: int) -> torch.Tensor:
    """``[B, Hkv, S, D]`` -> ``[B, Hkv * rep, S, D]``, each KV head ``rep`` times in a row (``repeat_interleave``'s
    order), as transformers' ``repeat_kv``: a view where there is one KV head, a copy otherwise."""
    b, hkv, s, d = x.shape
    return x[:, :, None].expand(b, hkv, rep, s, d).reshape(b, hkv * rep, s, d)


def _packable(mask: torch.Tensor, batch: int, heads: int) -> bool:
    """Whether a single query's mask can follow its heads packed by KV group: ``[B or 1, 1 or Hq, 1, Sk]``."""
    return mask.dim() == 4 and mask.shape[0] in (1, batch) and mask.shape[1] in (1, heads) and mask.shape[2] == 1


def _fixed_size(cache, layer_idx: int) -> bool:
    """Whether layer ``layer_idx`` of an HF cache is a preallocated buffer (``StaticCache`` and its sliding-window
    and offloaded forms), whose update returns every slot, filled or not."""
    layers = getattr(cache, "self_attention_cache", cache)
    layers = getattr(layers, "layers", None)
    if layers is None or layer_idx >= len(layers):
        return False
    return isinstance(layers[layer_idx], StaticLayer)


class ElasticAttention(nn.Module):
    """Self-attention over the first ``heads`` query heads (and their KV groups) of a HF attention module."""

    def __init__(self, hf_attn: nn.Module, config, *, head_dim: int, layer_idx: int) -> None:
        super().__init__()
        self.fused = hasattr(hf_attn, "c_attn")  # GPT-2
        self.head_dim = head_dim
        self.layer_idx = layer_idx
        self.config = config
        if self.fused:
            self.c_attn, self.c_proj = hf_attn.c_attn, hf_attn.c_proj
            self.attn_dropout, self.resid_dropout = hf_attn.attn_dropout, hf_attn.resid_dropout
            self.dropout_p = hf_attn.attn_dropout.p
            self.scaling = head_dim**-0.5 if getattr(config, "scale_attn_weights", True) else 1.0
            if getattr(config, "scale_attn_by_inverse_layer_idx", False):
                self.scaling /= float(layer_idx + 1)
            self.num_heads = self.c_attn.weight.shape[1] // 3 // head_dim
            self.num_kv_heads = self.num_heads
        else:
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
                hf_attn.q_proj, hf_attn.k_proj, hf_attn.v_proj, hf_attn.o_proj)
            self.dropout_p = float(getattr(hf_attn, "attention_dropout", 0.0))
            self.scaling = getattr(hf_attn, "scaling", head_dim**-0.5)
            self.num_heads = self.q_proj.weight.shape[0] // head_dim
            self.num_kv_heads = self.k_proj.weight.shape[0] // head_dim
        # Kept for callers that read them off HF attention modules.
        self.is_causal = True
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.heads = self.num_heads
        # Per-sequence query-head budgets ([B] ints) for the call in progress; set only for the duration of a
        # FlextronModel forward/generate that was given ``head_budgets`` (HF's generate drops unknown kwargs).
        self.head_budgets: torch.Tensor | None = None
        self._budget_memo: tuple | None = None
        self._drop_memo: tuple | None = None
        # The same budgets on the host as runs of adjacent sequences, ``[(first, end, heads), ...]``, set with
        # ``head_budgets`` by per-request budgets: a long prompt runs each run's projections at its own heads.
        self.head_runs: list[tuple[int, int, int]] | None = None
        self.stats: dict | None = None  # set by ranking: accumulates per-head output norms

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 without GQA)."""
        return self.num_heads // self.num_kv_heads

    # -- weights as the kernels see them ([N, K] views) ---------------------------------------------
    def qkv_weights(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """``(weight [N, H], bias)`` of q, k and v; GPT-2's are row blocks of the transposed fused ``c_attn``."""
        if self.fused:
            wt, b = self.c_attn.weight.t(), self.c_attn.bias
            n = self.num_heads * self.head_dim
            return [(wt[i * n:(i + 1) * n], None if b is None else b[i * n:(i + 1) * n]) for i in range(3)]
        return [(m.weight, m.bias) for m in (self.q_proj, self.k_proj, self.v_proj)]

    def out_proj(self) -> nn.Module:
        return self.c_proj if self.fused else self.o_proj

    def out_weight(self) -> torch.Tensor:
        """``[H, num_heads * head_dim]``."""
        w = self.out_proj().weight
        return w.t() if self.fused else w

    # -- forward ------------------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        # transformers <= 5.2x passes the cache as ``past_key_values``, later ones as ``cache``.
        cache = cache if cache is not None else past_key_values
        runs = self._runs(hidden_states, attention_mask)
        if runs is not None:
            return self._forward_runs(hidden_states, position_embeddings, attention_mask, cache, runs), None
        h, d = self.heads, self.head_dim
        kv = h // self.group_size
        shape = hidden_states.shape[:-1]
        if self.fused and h == self.num_heads and hidden_states.shape[-1] == self.c_attn.weight.shape[0]:
            # GPT-2 at every head: c_attn's one product, split as HF splits it (one launch, not three)
            wt = self.c_attn.weight.t()
            q, k, v = prefix_linear(hidden_states, wt, self.c_attn.bias, wt.shape[0]).split(h * d, dim=-1)
        else:
            (wq, bq), (wk, bk), (wv, bv) = self.qkv_weights()
            q = prefix_linear(hidden_states, wq, bq, h * d)
            k = prefix_linear(hidden_states, wk, bk, kv * d)
            v = prefix_linear(hidden_states, wv, bv, kv * d)
        q = q.view(*shape, h, d).transpose(1, 2)
        k = k.view(*shape, kv, d).transpose(1, 2)
        v = v.view(*shape, kv, d).transpose(1, 2)
        if position_embeddings is not None:
            q, k = apply_rotary(q, k, *position_embeddings)
        fixed = False
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
            fixed = _fixed_size(cache, self.layer_idx)
        budgets = self._budgets(q.shape[0])
        drop = None
        if budgets is not None and q.shape[2] == 1 and layers.masked_decode(hidden_states, True, k.shape[:3].numel()):
            drop = self._head_drop(budgets)
        o = attention_core(q, k, v, attention_mask, scaling=self.scaling,
                           dropout=self.dropout_p if self.training else 0.0, head_budgets=budgets,
                           fixed_cache=fixed, head_drop=drop)
        if self.stats is not None:
            self._accumulate(o)
        proj = self.out_proj()
        wo = self.out_weight()
        y = prefix_linear(o.reshape(*shape, h * d), wo, proj.bias, wo.shape[0])
        if self.fused:
            y = self.resid_dropout(y)
        return y, None

    def _runs(self, x: torch.Tensor, attention_mask) -> list[tuple[int, int, int]] | None:
        """The runs of :attr:`head_runs` to serve this call one by one (:func:`flextron.layers.serves_runs`), as
        ``(first, end, heads)`` with the heads capped at the active count in whole KV groups; or None."""
        runs = self.head_runs
        if self.head_budgets is None or self.stats is not None or not layers.serves_runs(runs, x):
            return None
        if attention_mask is not None and (attention_mask.dim() != 4 or attention_mask.shape[0] != x.shape[0]):
            return None
        g = self.group_size
        return [(first, end, max(g, min(h, self.heads) // g * g)) for first, end, h in runs]

    def _forward_runs(self, x, position_embeddings, attention_mask, cache, runs) -> torch.Tensor:
        """Per-request budgets on a long prompt: each run of adjacent sequences with one head budget projects,
        attends and projects back at its own heads (views of the weights, no copies); the cache gets every
        sequence's kept K/V heads and zeros for the rest, which its decode steps never read."""
        b, s, d = x.shape[0], x.shape[1], self.head_dim
        g, kv = self.group_size, self.heads // self.group_size
        (wq, bq), (wk, bk), (wv, bv) = self.qkv_weights()
        parts = []
        for first, end, h in runs:
            xs = x[first:end]
            n = end - first
            q = prefix_linear(xs, wq, bq, h * d).view(n, s, h, d).transpose(1, 2)
            k = prefix_linear(xs, wk, bk, h // g * d).view(n, s, h // g, d).transpose(1, 2)
            v = prefix_linear(xs, wv, bv, h // g * d).view(n, s, h // g, d).transpose(1, 2)
            if position_embeddings is not None:
                cos, sin = (t[first:end] if t.shape[0] == b else t for t in position_embeddings)
                q, k = apply_rotary(q, k, cos, sin)
            parts.append((first, end, h, q, k, v))
        fixed = False
        if cache is not None:  # in the projections' dtype (autocast's, where it is on), as the one-batch path caches
            keys = parts[0][4].new_zeros((b, kv, s, d))
            values = parts[0][5].new_zeros((b, kv, s, d))
            for first, end, h, _, k, v in parts:
                keys[first:end, : h // g] = k
                values[first:end, : h // g] = v
            keys, values = cache.update(keys, values, self.layer_idx)
            fixed = _fixed_size(cache, self.layer_idx)
        proj, wo = self.out_proj(), self.out_weight()
        by_first = {p[0]: p for p in parts}

        def run(first, end, h, out):
            q, k, v = by_first[first][3:]
            if cache is not None:
                k, v = keys[first:end, : h // g], values[first:end, : h // g]
            mask = None if attention_mask is None else attention_mask[first:end]
            o = attention_core(q, k, v, mask, scaling=self.scaling, dropout=self.dropout_p if self.training else 0.0,
                               fixed_cache=fixed)
            return prefix_linear(o.reshape(end - first, s, h * d), wo, proj.bias, wo.shape[0], out)

        y = layers.run_by_run(x, [p[:3] for p in parts], wo.shape[0], run)
        return self.resid_dropout(y) if self.fused else y

    def _budgets(self, batch: int) -> torch.Tensor | None:
        """This layer's per-sequence head counts: the requested budget capped at the active heads, rounded down
        to whole KV groups, at least one group. ``None`` when every sequence keeps all active heads."""
        b = self.head_budgets
        if b is None:
            return None
        if b.shape != (batch,):
            raise ValueError(f"head_budgets must have shape ({batch},) (one count per sequence), got {tuple(b.shape)}")
        g = self.group_size
        # Made once per budget tensor and active head count, not at every decode step (five small launches per layer
        # and step otherwise).
        return layers.per_sequence(self, "_budget_memo", b, (self.heads, g),
                                   lambda: (b.clamp(max=self.heads) // g * g).clamp(min=g).to(torch.int32))

    def _head_drop(self, budgets: torch.Tensor) -> torch.Tensor:
        """``[B, heads, 1, 1]`` booleans, True for each sequence's heads past its budget (from :meth:`_budgets`)."""
        return layers.per_sequence(
            self, "_drop_memo", budgets, (self.heads,),
            lambda: (torch.arange(self.heads, device=budgets.device)[None, :] >= budgets[:, None])[:, :, None, None])

    @torch.no_grad()
    def _accumulate(self, o: torch.Tensor) -> None:
        norms = o.detach().float().norm(dim=-1).reshape(-1, o.shape[-2])  # [tokens, h]: each head's output norm
        s = self.stats
        s["sum"] = s.get("sum", 0) + norms.sum(0)
        s["count"] = s.get("count", 0) + norms.shape[0]

    # -- weight surgery (ranking, extraction) -------------------------------------------------------
    def _head_index(self, head_perm: torch.Tensor, heads: int) -> torch.Tensor:
        d = self.head_dim
        return (head_perm[:, None] * d + torch.arange(d, device=head_perm.device)[None, :]).reshape(-1)[: heads * d]

    @torch.no_grad()
    def permute_(self, head_perm: torch.Tensor) -> None:
        """Reorder whole query heads (new head ``j`` is old head ``head_perm[j]``) and with them their KV heads.

        ``head_perm`` must keep each KV group's query heads together (checked by the caller); the KV heads follow
        the group order. Rows inside a head are never reordered, so RoPE is unaffected.
        """
        g = self.group_size
        kv_perm = head_perm.view(-1, g)[:, 0] // g
        q_idx = self._head_index(head_perm, self.num_heads)
        kv_idx = self._head_index(kv_perm, self.num_kv_heads)
        if self.fused:
            n = self.num_heads * self.head_dim
            w, b = self.c_attn.weight, self.c_attn.bias
            idx = torch.cat([q_idx, q_idx + n, q_idx + 2 * n])
            w.copy_(w.index_select(1, idx))
            if b is not None:
                b.copy_(b[idx])
            self.c_proj.weight.copy_(self.c_proj.weight.index_select(0, q_idx))
        else:
            for m, idx in ((self.q_proj, q_idx), (self.k_proj, kv_idx), (self.v_proj, kv_idx)):
                m.weight.copy_(m.weight.index_select(0, idx))
                if m.bias is not None:
                    m.bias.copy_(m.bias[idx])
            self.o_proj.weight.copy_(self.o_proj.weight.index_select(1, q_idx))

    @torch.no_grad()
    def slim_(self, heads: int) -> None:
        """Keep only the first ``heads`` query heads (and their KV heads), physically."""
        d, kv = self.head_dim, heads // self.group_size
        if self.fused:
            n, m = self.num_heads * d, heads * d
            idx = torch.cat([torch.arange(i * n, i * n + m) for i in range(3)]).to(self.c_attn.weight.device)
            self.c_attn.weight = nn.Parameter(self.c_attn.weight.index_select(1, idx).clone())
            if self.c_attn.bias is not None:
                self.c_attn.bias = nn.Parameter(self.c_attn.bias[idx].clone())
            self.c_attn.nf = 3 * m
            self.c_proj.weight = nn.Parameter(self.c_proj.weight[:m].clone())
        else:
            for lin, rows in ((self.q_proj, heads * d), (self.k_proj, kv * d), (self.v_proj, kv * d)):
                lin.weight = nn.Parameter(lin.weight[:rows].clone())
                if lin.bias is not None:
                    lin.bias = nn.Parameter(lin.bias[:rows].clone())
                lin.out_features = rows
            self.o_proj.weight = nn.Parameter(self.o_proj.weight[:, : heads * d].clone())
            self.o_proj.in_features = heads * d
        self.num_heads, self.num_kv_heads, self.heads = heads, kv, heads

    def extra_repr(self) -> str:
        return f"heads={self.heads}/{self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}"
