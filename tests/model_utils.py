"""Tiny real transformers models of every supported family, and an independent reference for sub-networks."""

from __future__ import annotations

import copy

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 96
FAMILIES = ["gpt2", "llama", "llama_gqa", "mistral", "qwen2"]


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A 2-layer random model in eval mode, as ``from_pretrained`` returns one; widths that are not tile multiples on
    purpose (MLP 72, 6 heads of 8); every other setting (dropout included) is the family's transformers default."""
    torch.manual_seed(seed)
    common = dict(num_hidden_layers=2, hidden_size=48, intermediate_size=72, vocab_size=VOCAB,
                  max_position_embeddings=64, head_dim=8)
    if family == "gpt2":
        # dropout as GPT-2 ships it (0.1 on attention, residuals and embeddings): eval mode must switch it off
        m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=48, n_head=6, n_inner=72, vocab_size=VOCAB, n_positions=64,
                                       bos_token_id=0, eos_token_id=0))
    elif family == "llama":
        m = LlamaForCausalLM(LlamaConfig(num_attention_heads=6, num_key_value_heads=6, **common))
    elif family == "llama_gqa":
        m = LlamaForCausalLM(LlamaConfig(num_attention_heads=6, num_key_value_heads=3, tie_word_embeddings=True,
                                         **common))
    elif family == "mistral":
        m = MistralForCausalLM(MistralConfig(num_attention_heads=6, num_key_value_heads=2, sliding_window=8, **common))
    elif family == "qwen2":
        m = Qwen2ForCausalLM(Qwen2Config(num_attention_heads=6, num_key_value_heads=2, **common))
        with torch.no_grad():  # random biases (HF initialises them to zero), so the bias slicing is exercised
            for layer in m.model.layers:
                for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    p.bias.normal_(0, 0.5)
    else:
        raise ValueError(family)
    if family == "gpt2":
        with torch.no_grad():
            for layer in m.transformer.h:
                layer.attn.c_attn.bias.normal_(0, 0.5)
                layer.mlp.c_fc.bias.normal_(0, 0.5)
    return m.eval()


def tokens(batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def masked_reference(model: torch.nn.Module, subnet) -> torch.nn.Module:
    """A plain HF copy of ``model`` computing ``subnet`` with HF's own code: the output projections' inputs of the
    dropped heads and neurons are zeroed, so they contribute nothing (dropped KV heads only feed dropped queries)."""
    ref = copy.deepcopy(model)
    ref.__dict__.pop("_compiled_call", None)  # a compiled forward transformers cached on the source runs the source
    gpt2 = hasattr(ref, "transformer")
    layers = ref.transformer.h if gpt2 else ref.model.layers
    with torch.no_grad():
        for i, layer in enumerate(layers):
            attn = layer.attn if gpt2 else layer.self_attn
            d = attn.head_dim
            if gpt2:
                layer.mlp.c_proj.weight[subnet.mlp[i]:] = 0
                attn.c_proj.weight[subnet.heads[i] * d:] = 0
            else:
                layer.mlp.down_proj.weight[:, subnet.mlp[i]:] = 0
                attn.o_proj.weight[:, subnet.heads[i] * d:] = 0
    return ref


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()
