"""Where a bf16 FlextronModel drifts from fp32, layer by layer, against the plain HF model in bf16.

A Llama of Llama-2-7B width (4 layers, random weights) is built in fp32 (the reference) and copied to bf16 twice:
the plain HF model and a FlextronModel. Each hidden state's relative error against fp32 is printed for both, then
for FlextronModels with one component swapped for plain torch (attention through SDPA, projections through
F.linear on the prefix views), which shows where precision goes.
Usage: python benchmarks/lab/bf16_drift.py [--tokens 1024] [--layers 4]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import flextron.attention as fattn
import flextron.mlp as fmlp
from flextron import FlextronModel


def hidden(model, x):
    with torch.no_grad():
        out = model(input_ids=x, output_hidden_states=True)
    return [h.float() for h in out.hidden_states] + [out.logits.float()]


def rels(got, ref):
    return [round(((g - r).norm() / r.norm()).item(), 5) for g, r in zip(got, ref)]


@contextlib.contextmanager
def patched(**swaps):
    saved = []
    for key, value in swaps.items():
        mod, name = key.split("__")
        target = {"attn": fattn, "mlp": fmlp}[mod]
        saved.append((target, name, getattr(target, name)))
        setattr(target, name, value)
    try:
        yield
    finally:
        for target, name, value in saved:
            setattr(target, name, value)


def plain_linear(x, w, b=None, n=None):
    n = n or w.shape[0]
    return F.linear(x, w[:n, : x.shape[-1]], None if b is None else b[:n])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      num_hidden_layers=args.layers, vocab_size=32000, max_position_embeddings=4096)
    ref = LlamaForCausalLM(cfg).cuda().eval()
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.tokens // args.batch), device="cuda")
    h32 = hidden(ref, x)
    hf16 = copy.deepcopy(ref).to(torch.bfloat16)
    fm = FlextronModel.from_hf(copy.deepcopy(ref).to(torch.bfloat16))
    rows = {"hf_bf16": rels(hidden(hf16, x), h32), "flextron_bf16": rels(hidden(fm, x), h32)}
    with patched(attn___kernel_fits=lambda *a, **k: False):
        rows["flextron_sdpa"] = rels(hidden(fm, x), h32)
    with patched(attn__sliced_linear=plain_linear, mlp__sliced_linear=plain_linear):
        rows["flextron_flinear"] = rels(hidden(fm, x), h32)
    with patched(attn__sliced_linear=plain_linear, mlp__sliced_linear=plain_linear,
                 attn___kernel_fits=lambda *a, **k: False):
        rows["flextron_all_plain"] = rels(hidden(fm, x), h32)
    # Sub-network: against its extracted plain model (fp32 reference = the fp32 extract)
    fm32 = FlextronModel.from_hf(copy.deepcopy(ref))
    sub = fm32.uniform_subnet(mlp=0.5, heads=0.5)
    ex32 = fm32.extract(sub)
    s32 = hidden(ex32, x)
    rows["sub_extract_bf16"] = rels(hidden(copy.deepcopy(ex32).to(torch.bfloat16), x), s32)
    fm.set_subnet(sub)
    rows["sub_flextron_bf16"] = rels(hidden(fm, x), s32)
    for k, v in rows.items():
        print(f"{k:>20}: " + " ".join(f"{e:.2e}" for e in v))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "tokens": args.tokens, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
