"""Speed of elastic_attention (prefill, backward) and elastic_attention_decode against SDPA, on a CUDA GPU.

Providers:
- ``flextron``: our kernels. A uniform budget runs on the head-prefix views ``q[:, :h]`` (``flextron_ms``) and as
  ``num_heads=h`` on the full tensors (``flextron_budget_ms``: the grid also covers the inactive heads, which
  write zeros); mixed budgets are one launch with a per-sequence ``num_heads`` tensor, ``validate=False``
  (``flextron_validated_ms`` adds the host sync that checks the budgets).
- ``sdpa_prefix``: ``F.scaled_dot_product_attention`` with the flash backend on the head-prefix views ``q[:, :h]``.
- ``sdpa_all``: SDPA flash on all heads (what a user gets without elastic heads).
- ``sdpa_groups``: for mixed budgets, the sum of SDPA flash times over each budget group (inputs pre-gathered,
  the gather not timed: a lower bound for that approach).
- decode: ``sdpa_cache`` (SDPA, default backend choice, on each cache) and ``floor`` (K/V bytes read over the
  measured device-to-device copy bandwidth).

bf16, D = 128, Hq = 32, Hkv in {32, 8}. Usage: ``python benchmarks/bench_elastic_attention.py [--out DIR]``.
Writes ``elastic_attention_<date>.json`` with the GPU name, versions, commit, date and every figure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
from _common import commit, result_path
from torch.nn.attention import SDPBackend, sdpa_kernel

from flextron_kernels import elastic_attention, elastic_attention_decode

DTYPE = torch.bfloat16
D, HQ = 128, 32
HKVS = [32, 8]
PREFILL_SHAPES = [(1, 8192), (8, 2048), (32, 512)]
FRACS = [0.25, 0.5, 0.75, 1.0]
DECODE_CTX = [1024, 4096, 16384, 32768]
DECODE_BATCH = [1, 8, 64]
DECODE_MAX_KV_BYTES = 12 << 30


def ms(fn, grad_to_none=None) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=40, grad_to_none=grad_to_none)


def graph_ms(fn, reps: int = 20) -> float:
    """GPU time of ``fn`` from CUDA graph replays, with L2 flushed before each call (decode reads a few MB
    that would otherwise stay cached): the replay of flush+fn minus the replay of flush alone. Serving loops
    run decode under CUDA graphs, so this leaves out Python and launch overhead, for every provider alike."""
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    fn()
    torch.cuda.synchronize()

    def capture(with_fn):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                flush.zero_()
                if with_fn:
                    fn()
        return g

    def replay_ms(g):
        g.replay()
        times = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    with_fn, without = capture(True), capture(False)
    return max(replay_ms(with_fn) - replay_ms(without), 1e-6) / reps


def sdpa_flash(q, k, v, causal=True):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])


def attn_flops(b, h, s, causal=True, bwd=False):
    f = 4 * b * h * s * s * D * (0.5 if causal else 1.0)
    return f * 2.5 if bwd else f


def tflops(flops, t_ms):
    return flops / (t_ms * 1e-3) / 1e12


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write of 1 GiB): the rate decode's floor assumes."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    t = ms(lambda: dst.copy_(src))
    return 2 * src.numel() / (t * 1e-3)


def _prefill_case(q, k, v, rep, t_all):
    b, _, s, _ = q.shape
    hkv = k.shape[1]
    rows = []
    for frac in FRACS:
        h = int(HQ * frac)
        qh, kh, vh = q[:, :h], k[:, : h // rep], v[:, : h // rep]
        t_view = ms(lambda qh=qh, kh=kh, vh=vh: elastic_attention(qh, kh, vh))
        t_budget = ms(lambda h=h: elastic_attention(q, k, v, h))
        t_sdpa = ms(lambda qh=qh, kh=kh, vh=vh: sdpa_flash(qh, kh, vh))
        # GPU time too (graph replays): an eager call of the smallest cases (~15 us of GPU work) reads the host's
        # launch time instead, which varied 2-3x between H200 hosts (benchmarks/README.md).
        g_view = graph_ms(lambda qh=qh, kh=kh, vh=vh: elastic_attention(qh, kh, vh))
        g_sdpa = graph_ms(lambda qh=qh, kh=kh, vh=vh: sdpa_flash(qh, kh, vh))
        rows.append(dict(kind="prefill", hkv=hkv, B=b, S=s, heads=h, flextron_ms=t_view, flextron_budget_ms=t_budget,
                         sdpa_prefix_ms=t_sdpa, sdpa_all_ms=t_all, flextron_tflops=tflops(attn_flops(b, h, s), t_view),
                         speed_vs_sdpa_prefix=t_sdpa / t_view, budget_speed_vs_sdpa_prefix=t_sdpa / t_budget,
                         speed_vs_sdpa_all=t_all / t_view, flextron_graph_ms=g_view, sdpa_prefix_graph_ms=g_sdpa,
                         speed_vs_sdpa_prefix_graph=g_sdpa / g_view))
    return rows


def _mixed_case(q, k, v, rep, t_all):
    b, _, s, _ = q.shape
    heads = torch.tensor([int(HQ * FRACS[i % 4]) for i in range(b)], device="cuda")
    t_mixed = ms(lambda: elastic_attention(q, k, v, heads, validate=False))
    t_mixed_checked = ms(lambda: elastic_attention(q, k, v, heads))  # + one host sync to check the budgets
    t_groups = 0.0
    for frac in FRACS:
        h = int(HQ * frac)
        idx = (heads == h).nonzero().flatten()
        qg, kg, vg = (x[idx, :n].contiguous() for x, n in ((q, h), (k, h // rep), (v, h // rep)))
        t_groups += ms(lambda qg=qg, kg=kg, vg=vg: sdpa_flash(qg, kg, vg))
    return dict(kind="mixed", hkv=k.shape[1], B=b, S=s, heads=heads.tolist(), flextron_ms=t_mixed,
                flextron_validated_ms=t_mixed_checked,
                sdpa_all_ms=t_all, sdpa_groups_ms=t_groups, speed_vs_sdpa_all=t_all / t_mixed,
                speed_vs_sdpa_groups=t_groups / t_mixed)


def _backward_case(q, k, v, rep, h):
    b, _, s, _ = q.shape
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    o = elastic_attention(qg, kg, vg, h)
    do = torch.randn_like(o)
    t_flex = ms(lambda: o.backward(do, retain_graph=True), grad_to_none=[qg, kg, vg])
    qs, ks, vs = (x[:, :n].detach().clone().requires_grad_() for x, n in ((q, h), (k, h // rep), (v, h // rep)))
    o_sdpa = sdpa_flash(qs, ks, vs)
    do_sdpa = torch.randn_like(o_sdpa)
    t_sdpa = ms(lambda: o_sdpa.backward(do_sdpa, retain_graph=True), grad_to_none=[qs, ks, vs])
    return dict(kind="backward", hkv=k.shape[1], B=b, S=s, heads=h, flextron_ms=t_flex, sdpa_prefix_ms=t_sdpa,
                flextron_tflops=tflops(attn_flops(b, h, s, bwd=True), t_flex), speed_vs_sdpa_prefix=t_sdpa / t_flex)


def prefill_rows(hkv):
    rows = []
    rep = HQ // hkv
    for b, s in PREFILL_SHAPES:
        q = torch.randn(b, HQ, s, D, device="cuda", dtype=DTYPE)
        k = torch.randn(b, hkv, s, D, device="cuda", dtype=DTYPE)
        v = torch.randn(b, hkv, s, D, device="cuda", dtype=DTYPE)
        t_all = ms(lambda q=q, k=k, v=v: sdpa_flash(q, k, v))
        rows += _prefill_case(q, k, v, rep, t_all)
        if b >= 4:
            rows.append(_mixed_case(q, k, v, rep, t_all))
        for frac in (0.5, 1.0):
            rows.append(_backward_case(q, k, v, rep, int(HQ * frac)))
        torch.cuda.empty_cache()
    return rows


def _decode_case(b, hkv, ctx, bandwidth):
    q = torch.randn(b, HQ, D, device="cuda", dtype=DTYPE)
    kc = torch.randn(b, hkv, ctx, D, device="cuda", dtype=DTYPE)
    vc = torch.randn(b, hkv, ctx, D, device="cuda", dtype=DTYPE)
    lens = torch.full((b,), ctx, device="cuda", dtype=torch.int32)
    heads = torch.full((b,), HQ, device="cuda", dtype=torch.int32)
    t_flex = graph_ms(lambda: elastic_attention_decode(q, kc, vc, lens, heads))
    t_eager = ms(lambda: elastic_attention_decode(q, kc, vc, lens, heads))  # validated: one host sync per call
    q4 = q[:, :, None]
    t_sdpa = graph_ms(lambda: F.scaled_dot_product_attention(q4, kc, vc, enable_gqa=hkv != HQ))
    kv_bytes = 2 * kc.numel() * kc.element_size()
    floor = kv_bytes / bandwidth * 1e3
    return dict(kind="decode", hkv=hkv, B=b, ctx=ctx, flextron_ms=t_flex, sdpa_cache_ms=t_sdpa,
                flextron_eager_ms=t_eager,
                floor_ms=floor, flextron_gbps=kv_bytes / (t_flex * 1e-3) / 1e9,
                ratio_to_floor=t_flex / floor, speed_vs_sdpa=t_sdpa / t_flex)


def decode_rows(hkv, bandwidth):
    rows = []
    for ctx in DECODE_CTX:
        for b in DECODE_BATCH:
            if 2 * b * hkv * ctx * D * 2 <= DECODE_MAX_KV_BYTES:
                rows.append(_decode_case(b, hkv, ctx, bandwidth))
        torch.cuda.empty_cache()
    return rows


# --decode-sweep: the split kernel's chunking policy (programs per SM, minimum chunk) on the cases that
# decide the decode target (contexts >= 4K at batch 1 and 8), flextron only.
SWEEP_PPS = [2, 4, 8]
SWEEP_MIN_CHUNK = [128, 512, 1024]


def decode_sweep(bandwidth):
    dec = sys.modules["flextron_kernels.elastic_attention_decode"]
    rows = []
    for hkv in HKVS:
        for ctx in DECODE_CTX[1:]:
            for b in (1, 8):
                q = torch.randn(b, HQ, D, device="cuda", dtype=DTYPE)
                kc = torch.randn(b, hkv, ctx, D, device="cuda", dtype=DTYPE)
                vc = torch.randn(b, hkv, ctx, D, device="cuda", dtype=DTYPE)
                lens = torch.full((b,), ctx, device="cuda", dtype=torch.int32)
                heads = torch.full((b,), HQ, device="cuda", dtype=torch.int32)
                floor = 2 * kc.numel() * kc.element_size() / bandwidth * 1e3
                for pps in SWEEP_PPS:
                    for mc in SWEEP_MIN_CHUNK:
                        with dec.chunk_policy(dec.ChunkPolicy(programs_per_sm=pps, min_chunk=mc)):
                            chunk, nsplit = dec.chunking(b, hkv, ctx, q.device)
                            t = graph_ms(lambda a=(q, kc, vc, lens, heads): elastic_attention_decode(*a))
                        rows.append(dict(hkv=hkv, B=b, ctx=ctx, programs_per_sm=pps, min_chunk=mc, chunk=chunk,
                                         splits=nsplit, flextron_ms=t, ratio_to_floor=t / floor))
                        print(rows[-1], flush=True)
    return rows


def best_configs():
    from flextron_kernels import elastic_attention as ea_mod  # noqa: F401
    from flextron_kernels import elastic_attention_decode as dec_mod  # noqa: F401

    mods = [sys.modules["flextron_kernels.elastic_attention"], sys.modules["flextron_kernels.elastic_attention_decode"]]
    out = {}
    for mod in mods:
        for name in dir(mod):
            kern = getattr(mod, name)
            cache = getattr(kern, "cache", None)
            if isinstance(cache, dict) and cache:
                out[name] = {str(key): str(cfg) for key, cfg in cache.items()}
    return out


def targets(rows):
    def worst(kind, key, pred=lambda r: True, fn=min):
        vals = [r[key] for r in rows if r["kind"] == kind and pred(r)]
        return fn(vals) if vals else None

    prefill = worst("prefill", "speed_vs_sdpa_prefix")
    prefill_graph = worst("prefill", "speed_vs_sdpa_prefix_graph")
    mixed = worst("mixed", "speed_vs_sdpa_all")
    decode = worst("decode", "ratio_to_floor", lambda r: r["ctx"] >= 4096, max)
    bwd = worst("backward", "speed_vs_sdpa_prefix")
    budget = worst("prefill", "budget_speed_vs_sdpa_prefix")
    return {
        "info_prefill_budget_form_min_speed_vs_sdpa_prefix": [budget, "info", budget is not None and budget >= 0.9],
        "prefill_uniform_min_speed_vs_sdpa_prefix": [prefill, ">= 0.9", prefill is not None and prefill >= 0.9],
        "prefill_uniform_min_speed_vs_sdpa_prefix_graph": [prefill_graph, ">= 0.9",
                                                           prefill_graph is not None and prefill_graph >= 0.9],
        "mixed_min_speed_vs_sdpa_all": [mixed, ">= 1.3", mixed is not None and mixed >= 1.3],
        "decode_ctx_ge_4k_max_ratio_to_floor": [decode, "<= 1.25", decode is not None and decode <= 1.25],
        "backward_min_speed_vs_sdpa": [bwd, ">= 0.8", bwd is not None and bwd >= 0.8],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--decode-sweep", action="store_true", help="only sweep the decode chunking policy")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_elastic_attention needs a CUDA GPU")
    torch.manual_seed(0)
    t0 = time.time()
    now = datetime.datetime.now(datetime.timezone.utc)
    path = str(result_path(args.out, "elastic_attention"))
    bw = copy_bandwidth()
    if args.decode_sweep:
        sweep = decode_sweep(bw)
        with open(result_path(args.out, "elastic_attention_decode_sweep"), "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), commit=commit(), date=now.isoformat(timespec="seconds"),
                           copy_bandwidth_gbps=bw / 1e9,
                           timing="CUDA graph replay, L2 flushed (graph_ms)", rows=sweep), f, indent=1)
        return
    rows = []
    # Saved after every section, so a run cut short still leaves its figures.
    for hkv in HKVS:
        rows += prefill_rows(hkv)
        save(path, now, bw, rows, t0)
        print(f"prefill hkv={hkv} done at {time.time() - t0:.0f} s", flush=True)
    for hkv in HKVS:
        rows += decode_rows(hkv, bw)
        save(path, now, bw, rows, t0)
    result = save(path, now, bw, rows, t0)
    report(result, rows, bw, path)


def save(path, now, bw, rows, t0):
    result = dict(
        benchmark="elastic_attention", gpu=torch.cuda.get_device_name(), torch=torch.__version__,
        triton=triton.__version__, commit=commit(), date=now.isoformat(timespec="seconds"),
        dtype=str(DTYPE), head_dim=D, hq=HQ, copy_bandwidth_gbps=bw / 1e9, causal=True,
        timing="prefill/backward: triton.testing.do_bench median ms (warmup 10 ms, rep 40 ms, L2 flushed); "
        "decode and prefill *_graph_ms: CUDA graph replay with L2 flushed before each call (graph_ms); "
        "flextron_eager_ms: do_bench",
        rows=rows, targets=targets(rows), best_configs=best_configs(), wall_s=time.time() - t0,
    )
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return result


def report(result, rows, bw, path):
    print(f"\n{result['gpu']}  torch {result['torch']}  triton {result['triton']}  copy {bw / 1e9:.0f} GB/s")
    head = f"{'kind':9} {'hkv':>3} {'B':>3} {'S/ctx':>6} {'heads':>6} {'flex ms':>9} {'base ms':>9} {'ratio':>6}"
    print(head + "  baseline")
    for r in rows:
        if r["kind"] == "decode":
            base, name, size, heads = r["floor_ms"], f"floor (sdpa {r['sdpa_cache_ms']:.3f})", r["ctx"], HQ
            ratio = r["ratio_to_floor"]
        elif r["kind"] == "mixed":
            base, name, size, heads = r["sdpa_all_ms"], f"sdpa_all (groups {r['sdpa_groups_ms']:.3f})", r["S"], "mix"
            ratio = r["speed_vs_sdpa_all"]
        elif r["kind"] == "prefill":
            base, size, heads = r["sdpa_prefix_ms"], r["S"], r["heads"]
            name = (f"sdpa_prefix (budget form {r['flextron_budget_ms']:.3f}: {r['budget_speed_vs_sdpa_prefix']:.2f}x; "
                    f"graph {r['flextron_graph_ms']:.3f} vs {r['sdpa_prefix_graph_ms']:.3f})")
            ratio = r["speed_vs_sdpa_prefix"]
        else:
            base, name, size, heads = r["sdpa_prefix_ms"], "sdpa_prefix", r["S"], r["heads"]
            ratio = r["speed_vs_sdpa_prefix"]
        print(f"{r['kind']:9} {r['hkv']:>3} {r['B']:>3} {size:>6} {heads:>6} {r['flextron_ms']:9.3f} {base:9.3f} "
              f"{ratio:6.2f}  {name}")
    for name, (val, want, ok) in result["targets"].items():
        print(f"target {name}: {val if val is None else round(val, 3)} (want {want}) {'MET' if ok else 'NOT MET'}")
    print(f"wrote {path} in {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
