"""Export a sub-network as a standalone, smaller model.

What transformers can load, and what we export:

- **Uniform subnet** (every layer the same widths), Llama / Mistral / Qwen2: a plain model of the same class with a
  smaller config (``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``, and ``head_dim`` written
  explicitly, since ``hidden_size / num_attention_heads`` would otherwise change it). It loads with
  ``AutoModelForCausalLM.from_pretrained`` without flextron.
- **Uniform subnet, GPT-2, all heads kept**: a plain ``GPT2LMHeadModel`` with ``n_inner`` set to the MLP width.
- **Uniform subnet whose head count does not divide ``hidden_size``** (stories260K at 75%: 6 heads of 8 with hidden
  64): transformers' configs reject it (``validate_architecture``), even with ``head_dim`` explicit, so it exports as a
  slim flextron model (below).
- **GPT-2 with fewer heads**: GPT-2 has no ``head_dim`` field; its head size is always ``n_embd / n_head`` and its
  ``c_attn`` is ``n_embd -> 3 n_embd``. Fewer heads of the same size cannot be written as a GPT-2 config, so this
  exports as a slim flextron model (below).
- **Heterogeneous subnet** (widths differ by layer): none of the four classes takes per-layer widths in transformers
  (``intermediate_size``/``num_attention_heads`` are scalars in their configs; only a few unrelated classes such as
  Gemma3n take a list of intermediate sizes). It exports as a slim flextron model: a :class:`FlextronModel` whose
  weights are physically cut to each layer's widths. ``save_pretrained`` writes it as a flextron checkpoint (HF
  ``config.json`` of the base model, ``model.safetensors`` with per-layer shapes, ``flextron.json`` with the
  per-layer sizes) and ``FlextronModel.from_pretrained`` loads it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .model import FlextronModel, implements
from .space import Subnet


def plain_config(fm: FlextronModel, subnet: Subnet):
    """The HF config of a plain model computing ``subnet``, or ``None`` when transformers cannot express it."""
    if not subnet.is_uniform:
        return None
    width, heads = subnet.mlp[0], subnet.heads[0]
    a = fm.attention_blocks[0]
    config = copy.deepcopy(fm.config)
    if fm.family == "gpt2":
        if heads != a.num_heads:
            return None
        config.n_inner = width
        return config
    if config.hidden_size % heads:
        return None  # transformers validates hidden_size % num_attention_heads == 0 on save and load
    config.intermediate_size = width
    config.num_attention_heads = heads
    config.num_key_value_heads = heads // a.group_size
    config.head_dim = a.head_dim
    return config


def _copy_sharing_tensors(fm: FlextronModel) -> FlextronModel:
    """A structural copy of ``fm`` whose parameters and buffers are ``fm``'s own objects (nothing is copied yet)."""
    memo = {id(t): t for t in (*fm.parameters(), *fm.buffers())}
    if fm.tokenizer is not None:
        memo[id(fm.tokenizer)] = fm.tokenizer
    out = copy.deepcopy(fm, memo)
    for m in out.modules():  # transformers caches a compiled forward bound to the source model: never reuse it
        m.__dict__.pop("_compiled_call", None)
    return out


def _own_tensors(out: nn.Module, shared: set[int]) -> None:
    """Give ``out`` its own copy of every parameter and buffer it still shares (ties stay tied)."""
    copies: dict[int, torch.Tensor] = {}
    for module in out.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is None or id(t) not in shared:
                    continue
                if id(t) not in copies:
                    c = t.detach().clone()
                    copies[id(t)] = nn.Parameter(c, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else c
                table[name] = copies[id(t)]


def slim(fm: FlextronModel, subnet: Subnet) -> FlextronModel:
    """A copy of ``fm`` whose weights are cut to ``subnet`` (its full model *is* that sub-network), in eval mode.

    Memory: the cut weights and the shared ones (embeddings, norms, head) are copied once; the full MLP and
    attention weights never are.
    """
    fm.check_subnet(subnet)
    active = fm.subnet
    fm.set_subnet(None)
    try:
        out = _copy_sharing_tensors(fm)
    finally:
        fm.set_subnet(active)
    with torch.no_grad():
        for i, (m, a) in enumerate(zip(out.mlp_blocks, out.attention_blocks)):
            m.slim_(subnet.mlp[i])  # each assigns new, cut parameters to the copy's modules
            a.slim_(subnet.heads[i])
            out.permutation["mlp"][i] = out.permutation["mlp"][i][: subnet.mlp[i]]
            out.permutation["heads"][i] = out.permutation["heads"][i][: subnet.heads[i]]
            if out.importance is not None:
                out.importance["mlp"][i] = out.importance["mlp"][i][: subnet.mlp[i]]
                out.importance["heads"][i] = out.importance["heads"][i][: subnet.heads[i]]
        _own_tensors(out, {id(t) for t in (*fm.parameters(), *fm.buffers())})
    out.subnet = None
    return out.eval()


@implements("extract")
def extract(fm: FlextronModel, subnet: Subnet) -> nn.Module:
    """A standalone model with the logits of ``subnet``, in eval mode: a plain transformers model of the same class
    where the config can express it, else a slim :class:`FlextronModel` (see the module docstring).

    The plain model is built on the meta device and takes the cut weights as they are (their dtype and device): no
    random initialisation, no copy through host memory.
    """
    slimmed = slim(fm, subnet)
    config = plain_config(fm, subnet)
    if config is None:
        return slimmed
    with torch.device("meta"):
        model = type(fm.model)(config)
    state = slimmed.model.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"export mismatch: missing {missing}, unexpected {unexpected}")
    if tied:
        model.tie_weights()
    model.generation_config = copy.deepcopy(fm.model.generation_config)
    # Buffers that are not in a state dict (rotary frequencies) come from the source model: same config values.
    source = dict(fm.model.named_buffers())
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            src = source.get(name)
            if src is None or src.shape != buf.shape:
                raise RuntimeError(f"export: no source for the buffer {name} {tuple(buf.shape)}")
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = src.detach().clone()
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"export: tensors left on the meta device: {left}")
    return model.eval()
