"""The elastic MLP: a Hugging Face MLP block whose active width is a prefix of its neurons.

It adopts the HF block's own children (``gate_proj``/``up_proj``/``down_proj`` of Llama, Mistral and Qwen2;
``c_fc``/``c_proj`` of GPT-2), so its state dict is the HF block's. Every weight is handed to the kernels as an
``[N, K]`` matrix: an ``nn.Linear`` weight as it is, a GPT-2 ``Conv1D`` weight (``[in, out]``) as its transposed
view, which the kernels read through its strides (no copy).
"""

from __future__ import annotations

import torch
from torch import nn

from flextron_kernels import nested_mlp

from . import layers
from .layers import prefix_linear

# Hugging Face activation names -> the kernels' names.
_ACTIVATIONS = {
    "silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh", "relu": "relu",
}


def kernel_activation(hf_name: str) -> str:
    if hf_name not in _ACTIVATIONS:
        raise ValueError(f"activation {hf_name!r} has no kernel equivalent; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[hf_name]


class ElasticMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` (gated) or ``c_proj(act(c_fc(x)))`` (GPT-2) over the first ``width`` neurons.

    ``width`` is the active neuron count of this layer (set by :meth:`FlextronModel.set_subnet`). With ``width``
    equal to the full size it computes exactly the HF block.
    """

    def __init__(self, hf_mlp: nn.Module, activation: str) -> None:
        super().__init__()
        self.gated = hasattr(hf_mlp, "gate_proj")
        if self.gated:
            self.gate_proj, self.up_proj, self.down_proj = hf_mlp.gate_proj, hf_mlp.up_proj, hf_mlp.down_proj
            self.act_fn = hf_mlp.act_fn
            self._up, self._down, self._act = "up_proj", "down_proj", "act_fn"
            self.conv1d = False
        else:  # GPT-2
            self.c_fc, self.c_proj = hf_mlp.c_fc, hf_mlp.c_proj
            self.act, self.dropout = hf_mlp.act, hf_mlp.dropout
            self._up, self._down, self._act = "c_fc", "c_proj", "act"
            self.conv1d = True
        self.activation = kernel_activation(activation)
        self.width = self.full_width
        # Per-token widths ([...] ints, shaped like the tokens) for the call in progress, set by a router; the
        # forward's ``widths`` argument takes precedence.
        self.token_widths: torch.Tensor | None = None
        # Per-sequence widths ([B] ints) for the call in progress (per-request budgets): each sequence's tokens run
        # its own width. ``token_widths`` and the forward's ``widths`` take precedence.
        self.sequence_widths: torch.Tensor | None = None
        # The same widths as runs of adjacent sequences, ``(first, end, width)``: a long prompt runs each run's
        # prefix products at its own width (:func:`flextron.layers.serves_runs`).
        self.width_runs: list[tuple[int, int, int]] | None = None
        self._widths_memo: tuple | None = None
        self._drop_memo: tuple | None = None
        self.stats: dict | None = None  # set by ranking: accumulates per-neuron |activation|

    # -- weights as the kernels see them ------------------------------------------------------------
    def _weight(self, name: str) -> torch.Tensor:
        w = getattr(self, name).weight
        return w.t() if self.conv1d else w

    def up_weight(self) -> torch.Tensor:
        """``[I, H]``."""
        return self._weight(self._up)

    def gate_weight(self) -> torch.Tensor | None:
        """``[I, H]`` or ``None``."""
        return self._weight("gate_proj") if self.gated else None

    def down_weight(self) -> torch.Tensor:
        """``[H, I]``."""
        return self._weight(self._down)

    @property
    def full_width(self) -> int:
        return self.up_weight().shape[0]

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, widths: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., H] -> [..., H]``.

        ``widths`` (optional, an integer tensor of shape ``x.shape[:-1]``, or ``self.token_widths``) gives each
        token its own neuron count, capped at the layer's active width: the grouped ``nested_mlp`` kernel runs
        then, so each token costs its own width. Without per-token widths the whole batch shares ``self.width``
        and the prefix products run (``F.linear`` on the weight views on a GPU, ``sliced_linear`` otherwise).
        Per-sequence widths (``sequence_widths``) on a long prompt run those products once per run of adjacent
        sequences that share a width (:func:`flextron.layers.serves_runs`); on a call of few tokens under the masked
        decode (:func:`flextron.layers.masked_decode`) once at the widest width, each sequence's neurons past its
        own zeroed; else the grouped kernel.
        """
        widths = self.token_widths if widths is None else widths
        if widths is None and self.sequence_widths is not None:
            b = self.sequence_widths
            if x.dim() < 2 or x.shape[0] != b.shape[0]:
                raise ValueError(f"per-sequence widths hold {b.shape[0]} sequences, but the input has shape "
                                 f"{tuple(x.shape)} (batch first)")
            if self.stats is None and layers.serves_runs(self.width_runs, x):
                return layers.run_by_run(x, self.width_runs, x.shape[-1], lambda first, end, w, out: self._dense(
                    x[first:end], max(1, min(w, self.width)), out=out))
            if self.stats is None and layers.masked_decode(x, attention=False):
                return self._dense(x, self.width, self._sequence_drop(b, x))
            widths = self._sequence_token_widths(b, x.shape[:-1])
        elif widths is not None:
            if widths.shape != x.shape[:-1]:
                raise ValueError(
                    f"widths must have shape {tuple(x.shape[:-1])} (one per token), got {tuple(widths.shape)}")
            # Clamped into [1, width] here, so the kernel's range check (a host sync per layer) can be skipped.
            widths = widths.clamp(1, self.width)
        if widths is not None:
            up, down = getattr(self, self._up), getattr(self, self._down)
            y = nested_mlp(
                x, self.up_weight(), self.down_weight(), widths, gate_weight=self.gate_weight(),
                up_bias=up.bias, down_bias=down.bias, activation=self.activation, check_widths=False,
            )
            return self.dropout(y) if self.conv1d else y
        return self._dense(x, self.width)

    def _dense(self, x: torch.Tensor, w: int, drop: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """Every token at width ``w``: the prefix products (and GPT-2's dropout); ``drop`` (booleans, broadcast
        against the activations) zeroes each token's neurons past its own width before the down projection; ``out``:
        the down projection's buffer (:func:`flextron.layers.run_by_run`)."""
        up, down = getattr(self, self._up), getattr(self, self._down)
        h = prefix_linear(x, self.up_weight(), up.bias, w)
        act = getattr(self, self._act)
        a = act(prefix_linear(x, self.gate_weight(), self.gate_proj.bias, w)) * h if self.gated else act(h)
        if drop is not None:  # in place outside autograd (a fresh product: one launch fewer per layer and step)
            a = a.masked_fill(drop, 0.0) if a.requires_grad else a.masked_fill_(drop, 0.0)
        if self.stats is not None:
            self._accumulate(a)
        dw = self.down_weight()
        y = prefix_linear(a, dw, down.bias, dw.shape[0], out)
        return self.dropout(y) if self.conv1d else y

    def _sequence_token_widths(self, b: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Each token's width from its sequence's (``b [B]``), clamped into ``[1, width]``; made once per widths
        tensor, active width and token shape (:func:`flextron.layers.per_sequence`)."""
        return layers.per_sequence(
            self, "_widths_memo", b, (self.width, tuple(shape)),
            lambda: b.view(-1, *([1] * (len(shape) - 1))).expand(shape).clamp(1, self.width))

    def _sequence_drop(self, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``[B, 1, ..., width]`` booleans, True for each sequence's neurons past its width (it keeps at least one);
        made once per widths tensor, active width and rank."""
        def make():
            cols = torch.arange(self.width, device=b.device)
            return cols >= b.clamp(min=1).view(-1, *([1] * (x.dim() - 1)))
        return layers.per_sequence(self, "_drop_memo", b, (self.width, x.dim()), make)

    @torch.no_grad()
    def _accumulate(self, a: torch.Tensor) -> None:
        a = a.detach().reshape(-1, a.shape[-1]).float()
        s = self.stats
        s["sum"] = s.get("sum", 0) + a.abs().sum(0)
        s["count"] = s.get("count", 0) + a.shape[0]

    # -- weight surgery (ranking, extraction) -------------------------------------------------------
    @torch.no_grad()
    def permute_(self, perm: torch.Tensor) -> None:
        """Reorder the neurons: new neuron ``j`` is old neuron ``perm[j]`` (function-preserving)."""
        out_dim = 1 if self.conv1d else 0  # the neuron axis of the up/gate weights
        in_dim = 0 if self.conv1d else 1  # ... and of the down weight
        for name in (self._up, "gate_proj") if self.gated else (self._up,):
            m = getattr(self, name)
            m.weight.copy_(m.weight.index_select(out_dim, perm))
            if m.bias is not None:
                m.bias.copy_(m.bias[perm])
        d = getattr(self, self._down)
        d.weight.copy_(d.weight.index_select(in_dim, perm))

    @torch.no_grad()
    def slim_(self, width: int) -> None:
        """Keep only the first ``width`` neurons, physically (new, smaller parameters)."""
        def cut(m, dim):
            m.weight = nn.Parameter(m.weight.narrow(dim, 0, width).clone())
            if dim == (1 if self.conv1d else 0) and m.bias is not None:
                m.bias = nn.Parameter(m.bias[:width].clone())
            if self.conv1d and dim == 1:
                m.nf = width
            elif not self.conv1d:
                if dim == 0:
                    m.out_features = width
                else:
                    m.in_features = width

        for name in (self._up, "gate_proj") if self.gated else (self._up,):
            cut(getattr(self, name), 1 if self.conv1d else 0)
        cut(getattr(self, self._down), 0 if self.conv1d else 1)
        self.width = width

    def extra_repr(self) -> str:
        return f"width={self.width}/{self.full_width}, activation={self.activation}"
