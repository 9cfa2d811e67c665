"""``FlextronModel``: a Hugging Face causal LM whose MLP and attention blocks run any prefix sub-network.

``FlextronModel.from_hf(model)`` swaps each decoder layer's MLP and attention module for an elastic one that adopts
the HF module's children (same attribute names, same parameters, no copy), so ``fm.model.state_dict()`` is the HF
model's state dict and the HF machinery around the blocks (embeddings, norms, rotary embeddings, masks, caches,
``generate``) is untouched. The conversion is in place: the model passed in is the one that becomes elastic.

The active sub-network lives on the blocks themselves (each block's ``width``/``heads``), set through
:meth:`FlextronModel.set_subnet`; there is no global state, and two FlextronModels never share it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Callable

import torch
from torch import nn

from .attention import ElasticAttention
from .mlp import ElasticMLP
from .space import ElasticSpace, Subnet, nearest

# HF class name -> family. The families differ only in where the blocks live and in GPT-2's Conv1D/fused c_attn.
SUPPORTED = {
    "GPT2LMHeadModel": "gpt2",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


def _layers(model: nn.Module, family: str) -> nn.ModuleList:
    return model.transformer.h if family == "gpt2" else model.model.layers


def _abbrev(choices: list[int]) -> str:
    return str(choices) if len(choices) <= 12 else f"[{', '.join(map(str, choices[:6]))}, ..., {choices[-1]}]"


# FlextronModel's operation methods (rank, extract, save_pretrained, set_budget, ...) run functions that the modules
# above this one register with ``@implements`` when ``flextron`` is imported, so this module imports none of them.
_IMPLEMENTATIONS: dict[str, Callable] = {}


def implements(method: str) -> Callable[[Callable], Callable]:
    """Decorator: the function becomes the implementation of ``FlextronModel.<method>``."""
    def register(fn: Callable) -> Callable:
        _IMPLEMENTATIONS[method] = fn
        return fn
    return register


def _implementation(method: str) -> Callable:
    fn = _IMPLEMENTATIONS.get(method)
    if fn is None:  # only when this module is loaded outside the flextron package
        raise RuntimeError(f"FlextronModel.{method} is implemented outside flextron.model: import flextron first")
    return fn


def _runs(values: list[int]) -> list[tuple[int, int, int]]:
    """Runs of equal adjacent values: ``[5, 5, 2, 5]`` -> ``[(0, 2, 5), (2, 3, 2), (3, 4, 5)]``."""
    out: list[tuple[int, int, int]] = []
    for i, v in enumerate(values):
        if out and out[-1][2] == v:
            out[-1] = (out[-1][0], i + 1, v)
        else:
            out.append((i, i + 1, v))
    return out


def _batch_size(args, kwargs) -> int | None:
    """The batch size of a forward/generate call, when its inputs tell (``input_ids`` or ``inputs_embeds``)."""
    x = kwargs.get("input_ids", args[0] if args else None)
    if x is None:
        x = kwargs.get("inputs_embeds")
    return x.shape[0] if isinstance(x, torch.Tensor) and x.dim() >= 2 else None


@functools.lru_cache(maxsize=64)
def _cache_kwarg(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def cache_kwarg(model: nn.Module) -> str:
    """The keyword under which ``model``'s forward (an HF model, or a :class:`FlextronModel`) takes a KV cache in the
    installed transformers: ``cache`` in releases that renamed it, ``past_key_values`` before. (An older release
    passes an unknown ``cache=`` on to the layers: the model would build its own cache and count positions from
    it.)"""
    return _cache_kwarg(type(model.model if isinstance(model, FlextronModel) else model))


class FlextronModel(nn.Module):
    """A causal LM whose every layer runs a prefix of its MLP neurons and attention heads.

    Attributes:
        model: the wrapped HF model (its blocks now elastic; its state dict unchanged).
        space: the :class:`ElasticSpace` the sub-networks are chosen from.
        subnet: the active :class:`Subnet`, or ``None`` for the full model.
        importance: ``{"mlp": [scores [I_l]], "heads": [scores [H_l]]}`` from the last :meth:`rank`, in the
            current (permuted) order, so each list is non-increasing along a prefix; ``None`` before ranking.
        permutation: ``{"mlp": [idx [I_l]], "heads": [idx [H_l]]}``: current neuron/head ``j`` of layer ``l`` is
            the original model's ``idx[j]`` (identity before any permutation).
    """

    def __init__(self, model: nn.Module, family: str, space: ElasticSpace, tokenizer=None) -> None:
        super().__init__()
        self.model = model
        # The model's tokenizer (a transformers tokenizer) or None; saved with the checkpoint when set.
        self.tokenizer = tokenizer
        self.family = family
        self.space = space
        self.subnet: Subnet | None = None
        self.importance: dict | None = None
        self.permutation = {
            "mlp": [torch.arange(m.full_width) for m in self.mlp_blocks],
            "heads": [torch.arange(a.num_heads) for a in self.attention_blocks],
        }

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, model: nn.Module, space: ElasticSpace | None = None, *, tokenizer=None) -> FlextronModel:
        """Make ``model`` (a transformers GPT-2, Llama, Mistral or Qwen2 causal LM) elastic, in place.

        ``tokenizer`` (optional): the model's tokenizer, kept on ``fm.tokenizer`` and written by every later
        :meth:`save_pretrained`. Raises ``TypeError`` for any other architecture, naming it and the supported ones.
        """
        name = type(model).__name__
        if isinstance(model, (str, os.PathLike)):
            raise TypeError(
                f"model must be a loaded transformers model, got the path {str(model)!r}: load it first, e.g. "
                f"FlextronModel.from_hf(AutoModelForCausalLM.from_pretrained({str(model)!r})); a flextron checkpoint "
                f"loads with FlextronModel.from_pretrained(path)"
            )
        if name not in SUPPORTED:
            raise TypeError(
                f"model must be one of the supported causal LMs {sorted(SUPPORTED)}, got {name}"
            )
        if space is None:
            space = ElasticSpace()
        if not isinstance(space, ElasticSpace):
            raise TypeError(f"space must be an ElasticSpace or None, got {type(space).__name__}")
        family = SUPPORTED[name]
        config = model.config
        # The elastic blocks interpret the masks HF builds for SDPA/eager (4-D, or None when causal suffices).
        if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
            config._attn_implementation = "sdpa"
        act = config.activation_function if family == "gpt2" else config.hidden_act
        for i, layer in enumerate(_layers(model, family)):
            attn_name = "attn" if family == "gpt2" else "self_attn"
            hf_attn = getattr(layer, attn_name)
            # Each new block takes the mode of the block it replaces (its adopted children keep their own), so a
            # model in eval mode stays in eval mode: no dropout at inference.
            if not isinstance(hf_attn, ElasticAttention):
                attn = ElasticAttention(hf_attn, config, head_dim=hf_attn.head_dim, layer_idx=i)
                attn.training = hf_attn.training
                setattr(layer, attn_name, attn)
            if not isinstance(layer.mlp, ElasticMLP):
                mlp = ElasticMLP(layer.mlp, act)
                mlp.training = layer.mlp.training
                layer.mlp = mlp
        fm = cls(model, family, space, tokenizer=tokenizer)
        fm.training = model.training
        for i in range(fm.num_layers):  # a space that does not fit this model fails here, not at first use
            fm.mlp_choices(i)
            fm.head_choices(i)
        return fm

    # -- structure ----------------------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def layers(self) -> nn.ModuleList:
        return _layers(self.model, self.family)

    @property
    def mlp_blocks(self) -> list[ElasticMLP]:
        return [layer.mlp for layer in self.layers]

    @property
    def attention_blocks(self) -> list[ElasticAttention]:
        return [layer.attn if self.family == "gpt2" else layer.self_attn for layer in self.layers]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def mlp_choices(self, layer: int) -> list[int]:
        """The MLP widths layer ``layer`` may take (sorted neuron counts)."""
        return self._mlp_choices(self.mlp_blocks[layer])

    def head_choices(self, layer: int) -> list[int]:
        """The query-head counts layer ``layer`` may take (whole KV groups)."""
        return self._head_choices(self.attention_blocks[layer])

    def _mlp_choices(self, m: ElasticMLP) -> list[int]:
        return self.space.mlp_choices(m.full_width)

    def _head_choices(self, a: ElasticAttention) -> list[int]:
        return self.space.head_choices(a.num_heads, a.group_size)

    def full_subnet(self) -> Subnet:
        full = self._full_sizes()
        return Subnet(*full, *full)

    def _full_sizes(self) -> tuple[list[int], list[int]]:
        return [m.full_width for m in self.mlp_blocks], [a.num_heads for a in self.attention_blocks]

    # -- sub-networks -------------------------------------------------------------------------------
    def check_subnet(self, subnet: Subnet) -> Subnet:
        """Validate ``subnet`` against this model and its space.

        Raises ``TypeError``/``ValueError`` whose message names the offending field (``subnet.mlp[3]``, ...).
        """
        if not isinstance(subnet, Subnet):
            raise TypeError(f"subnet must be a Subnet or None, got {type(subnet).__name__}")
        n = self.num_layers
        for name in ("mlp", "heads"):
            got = len(getattr(subnet, name))
            if got != n:
                raise ValueError(f"subnet.{name} must have {n} entries (one per layer), got {got}")
        mlps, attns = self.mlp_blocks, self.attention_blocks  # built once: each is a walk over the layers
        for i, w in enumerate(subnet.mlp):
            choices = self._mlp_choices(mlps[i])
            if w not in choices:
                raise ValueError(
                    f"subnet.mlp[{i}] = {w} is not an MLP width of the space for layer {i}: {_abbrev(choices)}"
                )
        for i, h in enumerate(subnet.heads):
            a = attns[i]
            if h % a.group_size:
                raise ValueError(
                    f"subnet.heads[{i}] = {h} splits a KV group: layer {i} has {a.num_kv_heads} KV heads of "
                    f"{a.group_size} query heads each, so heads must be a multiple of {a.group_size}"
                )
            choices = self._head_choices(a)
            if h not in choices:
                raise ValueError(
                    f"subnet.heads[{i}] = {h} is not a head count of the space for layer {i}: {_abbrev(choices)}"
                )
        return subnet

    def set_subnet(self, subnet: Subnet | None) -> None:
        """Make ``subnet`` active for every later forward and ``generate`` call; ``None`` is the full model."""
        full = subnet is None
        if not full:
            self.check_subnet(subnet)
        mlps, attns = self.mlp_blocks, self.attention_blocks
        for i, (m, a) in enumerate(zip(mlps, attns)):
            m.width = m.full_width if full else subnet.mlp[i]
            a.heads = a.num_heads if full else subnet.heads[i]
        sizes = ([m.full_width for m in mlps], [a.num_heads for a in attns])
        self.subnet = None if full or subnet == Subnet(*sizes, *sizes) else subnet.with_full(*sizes)

    def uniform_subnet(self, mlp: float = 1.0, heads: float = 1.0) -> Subnet:
        """The subnet keeping fraction ``mlp`` of every layer's neurons and ``heads`` of its heads.

        Each width is the nearest choice of the space (ties go to the larger), so the kept fraction can differ from
        the one asked: ``heads=0.5`` on 9 query heads in 3 KV groups (choices 3, 6, 9) keeps 6 heads (67%), since 4.5
        lies as near 6 as 3. The returned subnet's repr shows each count with its fraction.
        """
        for name, f in (("mlp", mlp), ("heads", heads)):
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
                raise ValueError(f"{name} must be a fraction in (0, 1], got {f!r}")
        mlps, attns = self.mlp_blocks, self.attention_blocks
        return Subnet(
            mlp=[nearest(self._mlp_choices(m), mlp * m.full_width) for m in mlps],
            heads=[nearest(self._head_choices(a), heads * a.num_heads) for a in attns],
        ).with_full([m.full_width for m in mlps], [a.num_heads for a in attns])

    def num_parameters(self, subnet: Subnet | None = None) -> int:
        """Parameters a sub-network uses (tied embeddings counted once); ``None``: the active one."""
        subnet = self.check_subnet(subnet) if subnet is not None else (self.subnet or self.full_subnet())
        seen, total = set(), 0
        for p in self.model.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel()
        for i, (m, a) in enumerate(zip(self.mlp_blocks, self.attention_blocks)):
            total -= _mlp_params(m, m.full_width) - _mlp_params(m, subnet.mlp[i])
            total -= _attn_params(a, a.num_heads) - _attn_params(a, subnet.heads[i])
        return total

    # -- running ------------------------------------------------------------------------------------
    def forward(self, *args, head_budgets: torch.Tensor | None = None, budgets=None, **kwargs):
        """The HF model's forward (``input_ids``, ``attention_mask``, ``labels``, ...) on the active sub-network.

        ``head_budgets``: optional ``[B]`` integer tensor, the query heads each sequence keeps (in every layer,
        capped at the layer's active heads and rounded down to whole KV groups, at least one group). The
        attention kernels then skip each sequence's dropped heads in one launch.
        ``budgets``: optional, one per sequence: a :class:`Subnet`, or a latency fraction in (0, 1] (the static
        router's subnet for it when one is attached, else the uniform subnet of that fraction). Each sequence runs
        its own sub-network in the same forward (heads through per-sequence head counts, MLP widths through the
        grouped per-token kernel); it replaces the active subnet for the call.
        """
        with self._budgets(head_budgets, budgets, _batch_size(args, kwargs)):
            return self.model(*args, **kwargs)

    def generate(self, *args, head_budgets: torch.Tensor | None = None, budgets=None, **kwargs):
        """HF ``generate`` on the active sub-network; the KV cache holds only the kept KV heads.

        ``head_budgets`` and ``budgets`` as in :meth:`forward`, fixed for the whole generation (prefill and every
        decode step), so each sequence's cache stays valid for its heads. With ``budgets``, every sequence's
        greedy tokens are those it gets generated alone at its sub-network; each layer caches the largest KV head
        count of the batch. One sequence per budget: beams and ``num_return_sequences`` > 1 are not supported.
        """
        with self._budgets(head_budgets, budgets, _batch_size(args, kwargs)):
            return self.model.generate(*args, **kwargs)

    def resolve_budgets(self, budgets) -> list[Subnet]:
        """One :class:`Subnet` per entry of ``budgets`` (Subnets as they are, checked; fractions through the static
        router when one is attached, else :meth:`uniform_subnet`). A 1-D float tensor (or numpy array) of fractions is
        taken as the list of its values."""
        if isinstance(budgets, torch.Tensor) or type(budgets).__module__ == "numpy":
            if budgets.ndim != 1 or not (budgets.dtype.is_floating_point if isinstance(budgets, torch.Tensor)
                                         else budgets.dtype.kind == "f"):
                raise TypeError(f"budgets as an array must be 1-D latency fractions (floats), got "
                                f"{budgets.ndim}-D {budgets.dtype}")
            budgets = budgets.tolist()
        if isinstance(budgets, (str, bytes)) or not isinstance(budgets, (list, tuple)):
            raise TypeError(f"budgets must be a list with one Subnet or latency fraction per sequence, got "
                            f"{type(budgets).__name__}")
        if not budgets:
            raise ValueError("budgets must hold one entry per sequence, got an empty list")
        out, by_fraction = [], {}  # one subnet per distinct fraction: a batch repeats a handful of budgets
        for i, b in enumerate(budgets):
            if isinstance(b, Subnet):
                try:
                    out.append(self.check_subnet(b))
                except (TypeError, ValueError) as e:
                    raise type(e)(f"budgets[{i}]: {e}") from None
            elif isinstance(b, (int, float)) and not isinstance(b, bool):
                if not 0 < b <= 1:
                    raise ValueError(f"budgets[{i}] must be a latency fraction in (0, 1] or a Subnet, got {b!r}")
                f = float(b)
                if f not in by_fraction:
                    by_fraction[f] = _implementation("subnet_for_budget")(self, f)
                out.append(by_fraction[f])
            else:
                raise TypeError(f"budgets[{i}] must be a Subnet or a latency fraction, got {type(b).__name__}")
        return out

    @contextlib.contextmanager
    def _budgets(self, head_budgets: torch.Tensor | None, budgets, batch: int | None):
        if budgets is None:
            with self._head_budgets(head_budgets):
                yield
            return
        if head_budgets is not None:
            raise ValueError("give either head_budgets or budgets, not both (a Subnet in budgets sets the heads)")
        adaptive = getattr(getattr(self, "routing", None), "budget", None)
        if adaptive is not None and adaptive.get("adaptive"):
            raise ValueError("budgets do not combine with an adaptive budget (its router sets every token's width): "
                             "call fm.set_budget(None) first")
        subnets = self.resolve_budgets(budgets)
        if batch is not None and len(subnets) != batch:
            raise ValueError(f"budgets holds {len(subnets)} entries but the batch has {batch} sequences: give one "
                             f"per sequence")
        device = next(self.model.parameters()).device
        active = self.subnet
        cap = Subnet(mlp=[max(s.mlp[i] for s in subnets) for i in range(self.num_layers)],
                     heads=[max(s.heads[i] for s in subnets) for i in range(self.num_layers)])
        self.set_subnet(cap)
        mlps, attns = self.mlp_blocks, self.attention_blocks
        try:
            # every layer's per-sequence widths and heads in one copy to the device ([2, layers, B]; rows are views)
            widths = [[s.mlp[i] for s in subnets] for i in range(len(mlps))]
            heads = [[s.heads[i] for s in subnets] for i in range(len(attns))]
            rows = torch.tensor([widths, heads]).to(device)
            for i, (m, a) in enumerate(zip(mlps, attns)):
                # a layer where every sequence agrees runs the shared prefix, as a plain subnet would
                m.sequence_widths = None if len(set(widths[i])) == 1 else rows[0, i]
                m.width_runs = None if m.sequence_widths is None else _runs(widths[i])
                a.head_budgets = None if len(set(heads[i])) == 1 else rows[1, i]
                a.head_runs = None if a.head_budgets is None else _runs(heads[i])
            yield
        finally:
            for m, a in zip(mlps, attns):
                m.sequence_widths = m.width_runs = None
                a.head_budgets = a.head_runs = None
            self.set_subnet(active)

    @contextlib.contextmanager
    def _head_budgets(self, budgets: torch.Tensor | None):
        # The budgets live on the attention modules for the duration of one call only: HF's generate() does
        # not pass unknown keyword arguments down to the layers.
        if budgets is not None:
            if not isinstance(budgets, torch.Tensor) or budgets.dtype.is_floating_point or budgets.dim() != 1:
                raise TypeError(f"head_budgets must be a 1-D integer tensor (one count per sequence), got {budgets!r}")
            if budgets.numel() and int(budgets.min()) < 1:
                raise ValueError(f"head_budgets must be >= 1, got min {int(budgets.min())}")
        blocks = self.attention_blocks
        device = next(self.model.parameters()).device
        for a in blocks:
            a.head_budgets = None if budgets is None else budgets.to(device)
        try:
            yield
        finally:
            for a in blocks:
                a.head_budgets = None

    # -- operations (implemented above this module: ranking, export, io, budget) -----------------------
    def calibrate_adaptive(self, batches, grid=None):
        """Pin the dynamic router's realised latency to its targets; see :func:`flextron.budget.calibrate_adaptive`."""
        return _implementation("calibrate_adaptive")(self, batches, grid)

    def set_budget(self, target: float | None, *, adaptive: bool = False, guarantee: bool = False):
        """Run within a latency budget (a fraction of the full latency); see :func:`flextron.budget.set_budget`."""
        return _implementation("set_budget")(self, target, adaptive=adaptive, guarantee=guarantee)

    def rank(self, batches, *, progress: bool = False) -> dict:
        """Rank neurons and heads on calibration ``batches``, then permute; see :func:`flextron.ranking.rank`."""
        return _implementation("rank")(self, batches, progress=progress)

    def permute(self, mlp: list[torch.Tensor] | None = None, heads: list[torch.Tensor] | None = None) -> None:
        """Apply per-layer permutations (function-preserving); see :func:`flextron.ranking.permute`."""
        _implementation("permute")(self, mlp=mlp, heads=heads)

    def extract(self, subnet: Subnet):
        """A standalone model computing ``subnet``; see :func:`flextron.export.extract`."""
        return _implementation("extract")(self, subnet)

    def save_pretrained(self, path, *, tokenizer=None, overwrite: bool = False) -> None:
        """Write a checkpoint directory atomically (with ``tokenizer``, else ``self.tokenizer`` when set); never
        deletes anything that is not a flextron checkpoint; see :func:`flextron.io.save_pretrained`."""
        _implementation("save_pretrained")(self, path, tokenizer=tokenizer, overwrite=overwrite)

    @classmethod
    def from_pretrained(cls, path) -> FlextronModel:
        """Load a directory written by :meth:`save_pretrained` (bit-exact); see :func:`flextron.io.load_pretrained`."""
        return _implementation("from_pretrained")(path)


def _linear_params(n_out: int, n_in: int, bias) -> int:
    return n_out * n_in + (n_out if bias is not None else 0)


def _mlp_params(m: ElasticMLP, width: int) -> int:
    hidden = m.up_weight().shape[1]
    up, down = getattr(m, m._up), getattr(m, m._down)
    total = _linear_params(width, hidden, up.bias) + hidden * width + (hidden if down.bias is not None else 0)
    if m.gated:
        total += _linear_params(width, hidden, m.gate_proj.bias)
    return total


def _attn_params(a: ElasticAttention, heads: int) -> int:
    d, kv = a.head_dim, heads // a.group_size
    hidden = a.out_weight().shape[0]
    (_, bq), (_, bk), (_, bv) = a.qkv_weights()
    out_bias = a.out_proj().bias
    qkv = _linear_params(heads * d, hidden, bq) + 2 * kv * d * hidden + (kv * d if bk is not None else 0) * 2
    return qkv + hidden * heads * d + (hidden if out_bias is not None else 0)
