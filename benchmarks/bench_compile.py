"""A FlextronModel forward eager and under torch.compile (the ops as custom ops, ``flextron_kernels/_ops.py``).

Small batches of an eager flextron forward are bound by host time (Python and Triton launches; benchmarks/README.md).
``torch.compile(mode="reduce-overhead")`` captures the whole forward in a CUDA graph, which an eager call cannot.
This times, per call (wall clock, host and device, synchronised every ``--calls`` calls), a Llama-shaped model with
random weights (bf16; a sub-network with head budgets and per-token MLP widths) at a few token counts:

- ``flextron_eager``, ``flextron_compiled`` (default mode), ``flextron_reduce_overhead``: the sub-network;
- ``full_eager``, ``full_reduce_overhead``: a second FlextronModel at full width with no per-token widths (every
  projection through ``sliced_linear`` at full width, the MLP too): the kernels' own cost against cuBLAS;
- ``hf_eager`` and ``hf_reduce_overhead``: the dense HF model it came from (an untouched copy: ``from_hf`` makes a
  model elastic in place), at full width.

Each compiled output is checked against eager (max abs difference, recorded). Writes one JSON file to ``--out``.

    python benchmarks/bench_compile.py --out benchmarks/results          # CUDA
    python benchmarks/bench_compile.py --device cpu --smoke              # CPU: a tiny model, aot_eager, no timing
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

if __name__ == "__main__" and "--device" in sys.argv and "cpu" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

from transformers import LlamaConfig, LlamaForCausalLM

from flextron import FlextronModel, Subnet


def build(device: str, smoke: bool):
    if smoke:
        cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=80, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, vocab_size=80, max_position_embeddings=64)
        dtype = torch.float32
    else:  # ~1B parameters: large enough to be real, small enough that host time shows at small batches
        cfg = LlamaConfig(num_hidden_layers=8, hidden_size=2048, intermediate_size=5632, num_attention_heads=16,
                          num_key_value_heads=16, head_dim=128, vocab_size=32000, max_position_embeddings=4096)
        dtype = torch.bfloat16
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).eval().to(device=device, dtype=dtype)
    # from_hf works in place: the dense baseline and the full-width FlextronModel are copies made before it.
    full = FlextronModel.from_hf(copy.deepcopy(hf))
    fm = FlextronModel.from_hf(copy.deepcopy(hf))
    # About three quarters of every layer, from the space's own choices.
    n = cfg.num_hidden_layers
    mlp = [min(fm.mlp_choices(i), key=lambda w: abs(w - 0.75 * cfg.intermediate_size)) for i in range(n)]
    heads = [min(fm.head_choices(i), key=lambda h: abs(h - 0.75 * cfg.num_attention_heads)) for i in range(n)]
    fm.set_subnet(Subnet(mlp=mlp, heads=heads))
    return cfg, hf, fm, full


def per_call_ms(fn, calls: int, repeats: int) -> float:
    """Median over ``repeats`` of the wall time of ``calls`` back-to-back calls (synchronised at the end), per call."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / calls * 1e3)
    return statistics.median(times)


def kernel_us(fn, calls: int = 5, top: int = 15) -> list:
    """GPU time per kernel name of one call (torch.profiler over ``calls`` eager calls), the ``top`` largest, µs."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    times = [(e.key[:70], round(e.device_time_total / calls, 1), e.count // calls) for e in prof.key_averages()
             if e.device_time_total > 0]
    return sorted(times, key=lambda r: -r[1])[:top]


def host_top(fn, calls: int = 10, top: int = 20) -> list:
    """Host time per Python function of one eager call (cProfile over ``calls`` calls, synchronised once at the
    end), the ``top`` largest by own time: (function, own µs per call, calls per call)."""
    import cProfile
    import pstats

    fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    prof.disable()
    stats = pstats.Stats(prof).stats
    rows = [(f"{os.path.basename(k[0])}:{k[1]}:{k[2]}"[:70], round(v[2] / calls * 1e6, 1), v[1] // calls)
            for k, v in stats.items()]
    return sorted(rows, key=lambda r: -r[1])[:top]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="a tiny model; outputs checked, nothing timed")
    ap.add_argument("--tokens", default="1,16,256", help="tokens per call (batch 1)")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile", type=int, default=0, metavar="T",
                    help="also GPU time per kernel (torch.profiler over eager calls) and host time per Python "
                    "function (cProfile) at T tokens, the largest per eager provider")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("bench_compile needs a CUDA GPU (or --device cpu --smoke)")
    cfg, hf, fm, full = build(args.device, args.smoke)
    backend = "inductor" if cuda else "aot_eager"
    rows = []
    for T in (int(t) for t in args.tokens.split(",")):
        if args.smoke:
            T = min(T, 32)
        g = torch.Generator().manual_seed(T)
        ids = torch.randint(0, cfg.vocab_size, (1, T), generator=g).to(args.device)
        for m in fm.mlp_blocks:  # per-token widths up to the layer's active width
            m.token_widths = torch.randint(1, m.width + 1, (1, T), generator=g).to(args.device)
        torch._dynamo.reset()

        def call(model, ids=ids):  # one function object per provider: each compiles on its own
            return lambda: model(ids).logits
        providers = {"flextron_eager": call(fm), "flextron_compiled": torch.compile(call(fm), backend=backend)}
        if cuda:
            providers["flextron_reduce_overhead"] = torch.compile(call(fm), mode="reduce-overhead")
            providers["full_eager"] = call(full)
            providers["full_reduce_overhead"] = torch.compile(call(full), mode="reduce-overhead")
            providers["hf_eager"] = call(hf)
            providers["hf_reduce_overhead"] = torch.compile(call(hf), mode="reduce-overhead")
        row = {"T": T, "ms_per_call": {}, "max_abs_diff_vs_eager": {}}
        with torch.no_grad():
            want = {"flextron": fm(ids).logits.float(), "full": full(ids).logits.float()}
            for name, fn in providers.items():
                out = fn().float()
                kind = name.split("_")[0]
                if kind in want:
                    row["max_abs_diff_vs_eager"][name] = (out - want[kind]).abs().max().item()
                if cuda:
                    row["ms_per_call"][name] = per_call_ms(fn, args.calls, args.repeats)
            if cuda and T == args.profile:
                eager = ("flextron_eager", "full_eager", "hf_eager")
                row["kernels_us"] = {name: kernel_us(providers[name]) for name in eager}
                row["host_us"] = {name: host_top(providers[name]) for name in eager}
        rows.append(row)
        print(row, flush=True)
    if cuda:
        from _common import result_path, run_info
        info = run_info()
        path = result_path(args.out, "compile")
        with open(path, "w") as f:
            subnet = {"mlp": [m.width for m in fm.mlp_blocks], "heads": [a.heads for a in fm.attention_blocks],
                      "token_widths": "uniform in [1, the layer's mlp width] per token"}
            json.dump({"bench": "compile", "info": info, "config": cfg.to_dict(), "subnet": subnet, "rows": rows}, f,
                      indent=1, default=str)
        print("wrote", path)


if __name__ == "__main__":
    main()
