"""nested_mlp exploration on a GPU: the sorted path's block-config sweep (EXPLORE variants of the plan, forward and
forward+backward, eager and graph-timed), the host cost of a call, and per-kernel profiles.

    python benchmarks/lab/explore_nested_mlp.py --out DIR [--explore-only base,c1] [--explore-t 256,1024]
    python benchmarks/lab/explore_nested_mlp.py --host --models llama2-7b
    python benchmarks/lab/explore_nested_mlp.py --profile-bwd 8192 [--explore-only base,bwd_up_s4]

Each variant runs through ``flextron_kernels.nested_mlp.plan.override``; ``bench_nested_mlp.py`` is the product
benchmark. ``--explore`` is accepted (and implied) so that ``gpu_check.sh explore`` arguments carry over.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # benchmarks/

import torch
from bench_nested_mlp import EXTRA_MODELS, MODELS, _bench, _graph, _mlp, _widths, new_result

from flextron_kernels import nested_mlp
from flextron_kernels.nested_mlp import plan as nm_plan

# Block configs of the sorted path, forward and forward+backward, uniform mix (flextron only).
_M128 = {"BLOCK_M": 128, "num_warps": 8, "num_stages": 4}
# Relative to the plan at each size (256 tokens: 64x256 up tiles, down in two K chunks).
EXPLORE = {
    "pointer": None,  # the plan as it is, pointer tiles forced
    "base": {},
    "split1": {"down": {"SPLIT_K": 1}},
    "split2": {"down": {"SPLIT_K": 2}},
    "split3": {"down": {"SPLIT_K": 3}},
    "split4": {"down": {"SPLIT_K": 4}},
    "up_64x128_w4_s4": {"up": {"BLOCK_N": 128, "num_warps": 4, "num_stages": 4}},
    "up_128x128_w8_s3": {"up": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}},
    "up_64x256_gm1": {"up": {"GROUP_M": 1}},
    "up_64x256_w4": {"up": {"num_warps": 4}},
    "down_n256_w8_split4": {"down": {"BLOCK_N": 256, "num_warps": 8, "num_stages": 3, "SPLIT_K": 4}},
    "down_n128_w8": {"down": {"num_warps": 8}},
    "down_128x128_w8_split4": {"up": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3},
                               "down": {"BLOCK_M": 128, "num_warps": 8, "num_stages": 3, "SPLIT_K": 4}},
    "up_m128": {"up": dict(_M128, BLOCK_N=128), "down": {"SPLIT_K": 1}},
    "epi_pointer": {"up": {"EPI_TMA": False}},  # the up kernel's buffer tiles by pointers
    "bwd_up_n256": {"up_bwd": {"BLOCK_N": 256}},  # dA in 128x256 tiles (the forward's: 128x128)
    "bwd_up_n256_s4": {"up_bwd": {"BLOCK_N": 256, "num_stages": 4}},
    "up_64x128_w4_s2": {"up": {"BLOCK_N": 128, "num_warps": 4, "num_stages": 2}},  # two programs per SM
    "up_64x128_w8_s2": {"up": {"BLOCK_N": 128, "num_warps": 8, "num_stages": 2}},
    "up_64x128_w4_s3": {"up": {"BLOCK_N": 128, "num_warps": 4, "num_stages": 3}},
    "bwd_tma": {"tma_bwd": True},  # the backward's up, down and weight-gradient tiles by TMA below 1025 tokens
    "bwd_tma_s4": {"tma_bwd": True, "up_bwd": {"num_stages": 4}},
    "route1": {"fused_route": True},  # the routing in one launch (rank, gather, tail plan, zeroed counts)
    # 64 tokens a program, counting steps of 128, 4 warps (the count kernel's blocks; ptxas: 255 registers)
    "route1_t64": {"fused_route": True, "route": {"BLOCK_T": 64, "BLOCK_U": 128, "num_warps": 4}},
    "route1_t32": {"fused_route": True, "route": {"BLOCK_T": 32}},  # 128-198 registers at 256-1024 tokens
    "tail0": {"up": {"TAIL": 1}},  # no tail split of the up product (one launch)
    # Small problems (llama-1b at 256 tokens: 44 up tiles of 64x256 for 132 SMs): narrower tiles, more K chunks.
    "up_64x128_w4_s4_t1": {"up": {"BLOCK_N": 128, "num_warps": 4, "num_stages": 4, "TAIL": 1}},
    "up_64x64_w4_s4_t1": {"up": {"BLOCK_N": 64, "num_warps": 4, "num_stages": 4, "TAIL": 1}},
    "down_n64": {"down": {"BLOCK_N": 64}},
    "down_n64_split4": {"down": {"BLOCK_N": 64, "SPLIT_K": 4}},
    "small_128_s4": {"up": {"BLOCK_N": 128, "num_warps": 4, "num_stages": 4, "TAIL": 1}, "down": {"SPLIT_K": 4}},
    "small_64_s4": {"up": {"BLOCK_N": 64, "num_warps": 4, "num_stages": 4, "TAIL": 1}, "down": {"SPLIT_K": 4}},
    "small_64_n64_s4": {"up": {"BLOCK_N": 64, "num_warps": 4, "num_stages": 4, "TAIL": 1},
                        "down": {"BLOCK_N": 64, "SPLIT_K": 4}},
    # Deeper pipelines: a latency-bound K loop moves (stages x stage bytes) per load latency; cuBLAS's
    # kernels at these sizes run 64x64 tiles with 7-13 stages (torch.profiler names, bench_compile.py --profile).
    "down_s8": {"down": {"num_stages": 8}},  # 64x128, 192 KB: one program per SM
    # The same with the backward's dx kept on 4 stages (its two-operand tiles take twice the shared memory).
    "down_s8b": {"down": {"num_stages": 8}, "down_bwd": {"num_stages": 4}},
    "down_s6b": {"down": {"num_stages": 6}, "down_bwd": {"num_stages": 4}},
    "down_s8b_split1": {"down": {"num_stages": 8, "SPLIT_K": 1}, "down_bwd": {"num_stages": 4}},
    "down_s6b_split1": {"down": {"num_stages": 6, "SPLIT_K": 1}, "down_bwd": {"num_stages": 4}},
    "down_s8b_split4": {"down": {"num_stages": 8, "SPLIT_K": 4}, "down_bwd": {"num_stages": 4}},
    # 64x128 up tiles in 5 stages (no tail split) with the deep down pipeline, one K chunk (7B/8B: 128 down tiles) or
    # two (1B: 64): one wave of down programs, one per SM.
    "c1": {"up": {"BLOCK_N": 128, "num_warps": 4, "num_stages": 5, "TAIL": 1},
           "down": {"num_stages": 8, "SPLIT_K": 1}, "down_bwd": {"num_stages": 4}},
    "c1_w8": {"up": {"BLOCK_N": 128, "num_warps": 8, "num_stages": 5, "TAIL": 1},
              "down": {"num_stages": 8, "SPLIT_K": 1}, "down_bwd": {"num_stages": 4}},
    "c1_t2": {"up": {"BLOCK_N": 128, "num_warps": 4, "num_stages": 5, "TAIL": 2, "TAIL_ROUNDS": 2,
                     "TAIL_CFG": {"num_warps": 4, "num_stages": 4}},
              "down": {"num_stages": 8, "SPLIT_K": 1}, "down_bwd": {"num_stages": 4}},
    "down_k128_s4_split1": {"down": {"BLOCK_K": 128, "num_stages": 4, "SPLIT_K": 1},
                            "down_bwd": {"BLOCK_K": 64, "num_stages": 4}},
    "c1_k128": {"up": {"BLOCK_N": 128, "num_warps": 4, "num_stages": 5, "TAIL": 1},
                "down": {"BLOCK_K": 128, "num_stages": 4, "SPLIT_K": 1}, "down_bwd": {"BLOCK_K": 64, "num_stages": 4}},
    # At 256 tokens against 64x128 up tiles in 5 stages and the down product in 8 stages filling a wave.
    "route_1sm": {"route": {"PER_SM": 1}},  # the routing's gather in one wave of programs (default two)
    "route_1sm_t32": {"route": {"PER_SM": 1, "BLOCK_T": 32}},
    "route_4sm": {"route": {"PER_SM": 4}},
    "up_s4": {"up": {"num_stages": 4}},
    "up_gm4": {"up": {"GROUP_M": 4}},
    "up_prev": {"up": {"BLOCK_N": 256, "num_warps": 8, "num_stages": 3, "TAIL": 4, "TAIL_ROUNDS": 2,
                       "TAIL_CFG": {"num_warps": 4, "num_stages": 4}}},  # 64x256 tiles with the tail split
    "down_k128": {"down": {"BLOCK_K": 128, "num_stages": 4}, "down_bwd": {"BLOCK_K": 64}},
    "down_w8": {"down": {"num_warps": 8}},
    "down_n256_s4": {"down": {"BLOCK_N": 256, "num_stages": 4}, "down_bwd": {"BLOCK_N": 128}},
    "down_n256_s4_w8": {"down": {"BLOCK_N": 256, "num_stages": 4, "num_warps": 8}, "down_bwd": {"BLOCK_N": 128}},
    "small_a": {"up": {"BLOCK_N": 64, "num_warps": 4, "num_stages": 4, "TAIL": 1},
                "down": {"num_stages": 8}, "down_bwd": {"num_stages": 4}},
    "small_b": {"up": {"BLOCK_N": 64, "num_warps": 4, "num_stages": 4, "TAIL": 1},
                "down": {"num_stages": 8, "SPLIT_K": 4}, "down_bwd": {"num_stages": 4}},
    "small_c": {"up": {"BLOCK_N": 128, "num_warps": 4, "num_stages": 5, "TAIL": 1},
                "down": {"num_stages": 8}, "down_bwd": {"num_stages": 4}},
    "small_d": {"up": {"BLOCK_N": 64, "num_warps": 4, "num_stages": 4, "TAIL": 1},
                "down": {"num_stages": 6, "SPLIT_K": 4}, "down_bwd": {"num_stages": 4}},
    "down_n64_s8": {"down": {"BLOCK_N": 64, "num_stages": 8}},  # 128 KB
    "down_n64_s12_split1": {"down": {"BLOCK_N": 64, "num_stages": 12, "SPLIT_K": 1}},  # 192 KB
    "down_n64_s6_split4": {"down": {"BLOCK_N": 64, "num_stages": 6, "SPLIT_K": 4}},  # 96 KB: two per SM
    "up_64x128_s5_t1": {"up": {"BLOCK_N": 128, "num_warps": 4, "num_stages": 5, "TAIL": 1}},  # 200 KB
    "up_64x64_s8_t1": {"up": {"BLOCK_N": 64, "num_warps": 4, "num_stages": 8, "TAIL": 1}},  # 192 KB
    "small_64_s8": {"up": {"BLOCK_N": 64, "num_warps": 4, "num_stages": 8, "TAIL": 1},
                    "down": {"BLOCK_N": 64, "num_stages": 8}},
    "small_128_s5": {"up": {"BLOCK_N": 128, "num_warps": 4, "num_stages": 5, "TAIL": 1},
                     "down": {"BLOCK_N": 64, "num_stages": 8}},
    # 128-row tiles in both products (all-full batches need no padding): does the down product's time follow its L2
    # traffic (the weight read once per row tile)?
    "down_128x128_w8_split2": {"up": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3},
                               "down": {"BLOCK_M": 128, "num_warps": 8, "num_stages": 3, "SPLIT_K": 2}},
    "down_128x128_w4_s4": {"up": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3},
                           "down": {"BLOCK_M": 128, "num_warps": 4, "num_stages": 4, "SPLIT_K": 2}},
    "tail4": {"up": {"TAIL": 4}},
    "tail2_s4": {"up": {"TAIL": 2, "TAIL_CFG": {"num_stages": 4}}},
    "tail4_w4": {"up": {"TAIL": 4, "TAIL_ROUNDS": 2, "TAIL_CFG": {"num_warps": 4, "num_stages": 4}}},
    "tail4_w4_r3": {"up": {"TAIL": 4, "TAIL_ROUNDS": 3, "TAIL_CFG": {"num_warps": 4, "num_stages": 4}}},
    "tail4_w4_s3": {"up": {"TAIL": 4, "TAIL_ROUNDS": 2, "TAIL_CFG": {"num_warps": 4, "num_stages": 3}}},
    "tail4_s6": {"up": {"TAIL": 4, "TAIL_CFG": {"num_stages": 6}}},
    "tail8_w4_r3": {"up": {"TAIL": 8, "TAIL_ROUNDS": 3, "TAIL_CFG": {"num_warps": 4, "num_stages": 4}}},
    "tail4_k128": {"up": {"TAIL": 4, "TAIL_ROUNDS": 2, "TAIL_CFG": {"num_warps": 4, "num_stages": 3, "BLOCK_K": 128}}},
    "tail4_w4_s5": {"up": {"TAIL": 4, "TAIL_ROUNDS": 2, "TAIL_CFG": {"num_warps": 4, "num_stages": 5}}},
    "tail2_w4_s4": {"up": {"TAIL": 2, "TAIL_ROUNDS": 2, "TAIL_CFG": {"num_warps": 4, "num_stages": 4}}},
    "tail2_w4_s3": {"up": {"TAIL": 2, "TAIL_ROUNDS": 2, "TAIL_CFG": {"num_warps": 4, "num_stages": 3}}},
    "bwd_up_s3": {"up_bwd": {"num_stages": 3}},
    "bwd_up_w4": {"up_bwd": {"num_warps": 4}},
    "bwd_up_s4": {"up_bwd": {"num_stages": 4}},
    "bwd_up_k128_s2": {"up_bwd": {"BLOCK_K": 128, "num_stages": 2}},
    "bwd_up_gm1": {"up_bwd": {"GROUP_M": 1}},
    "bwd_epi1": {"up_bwd": {"EPI_SPLIT": 1}},  # the dA epilogue whole (the plan stores it in two N halves)
    "up_k32_s6": {"up": {"BLOCK_K": 32, "num_stages": 6}},  # 3 stages' bytes in flight (K 64), in more loads
    "up_k32_s5": {"up": {"BLOCK_K": 32, "num_stages": 5}},
    # Register spills in the backward (benchmarks/lab/kernel_regs.py): none with these.
    "wgrad_j64": {"wgrad": {"BLOCK_J": 64}},
    "wgrad_t32": {"wgrad": {"BLOCK_T": 32}},
    "bwd_nospill": {"down": {"num_warps": 8}, "wgrad": {"BLOCK_T": 32}},
    # Weight gradients at 256 tokens: with the plan's 128x128 tiles in 8 warps, ptxas gives 183 / 255 registers (dWd /
    # dWu+dWg): one program per SM, so a tile's 8-step K loop and its store never overlap another tile's. These give
    # two programs per SM (ptxas for sm_90 on the CPU, benchmarks/lab/kernel_regs.py; not yet timed on a GPU):
    "wgrad_j64_w4": {"wgrad": {"BLOCK_J": 64, "num_warps": 4}},  # 254 / 255 registers of 128 threads, no spills
    "wgrad_j64_w4_s2": {"wgrad": {"BLOCK_J": 64, "num_warps": 4, "num_stages": 2}},
    "wgrad_64x64_w4": {"wgrad": {"BLOCK_J": 64, "BLOCK_N": 64, "num_warps": 4}},  # 128 / 220 registers, no spills
    # dx (the backward's down product) on its own config (ptxas at 256 tokens: the plan's 255 registers, 224 B
    # spilled, from the split-K fixup; unsplit 90 registers; 64-column tiles 216, no spills)
    "dx_split1": {"down_bwd": {"SPLIT_K": 1}},
    "dx_n64": {"down_bwd": {"BLOCK_N": 64}},
    "dx_n64_s3": {"down_bwd": {"BLOCK_N": 64, "num_stages": 3}},  # 98 KB shared: two programs per SM
    # dA in 64x128 tiles (twice the programs; ptxas at 256 tokens: 80 registers in 8 warps, 190 in 4; 98 KB shared)
    "bwd_up_n128": {"up_bwd": {"BLOCK_N": 128}},
    "bwd_up_n128_w4": {"up_bwd": {"BLOCK_N": 128, "num_warps": 4}},
    # the backward at 256 tokens with dx in two K chunks and dA on the forward's 64x256 tiles
    "bwd_prev": {"down_bwd": {"SPLIT_K": 2}, "up_bwd": {"BLOCK_N": 256}},
    # The weight gradients' tiles by TMA stores (ptxas at 256 tokens: 196 / 250 registers; 64x128 in 4 warps 168 /
    # 255; 64x64 96 / 144; no spills)
    # 128x64 up tiles (as many tiles as 64x128 at full width, 20% less L2 traffic per K step: 16 KB of
    # x and 16 KB of weights against 8 + 32 KB); dA keeps 128-wide N blocks in 8 warps.
    "m128n64_w4_s6": {"up": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 6},
                      "up_bwd": {"num_warps": 8}},
    "m128n64_w8_s6": {"up": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 6},
                      "up_bwd": {"num_warps": 8}},
    "m128n64_w8_s5": {"up": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 5},
                      "up_bwd": {"num_warps": 8}},
    "plan9": {"up": {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 5}},  # 64x128 up tiles, 5 stages
    "base_again": {},  # the plan as it is, timed last (drift across the sweep)
    "wgrad_epi": {"wgrad": {"EPI_TMA": True}},
    "wgrad_j64_w4_epi": {"wgrad": {"BLOCK_J": 64, "num_warps": 4, "EPI_TMA": True}},
    "wgrad_64x64_w4_epi": {"wgrad": {"BLOCK_J": 64, "BLOCK_N": 64, "num_warps": 4, "EPI_TMA": True}},
}


def plan_change(over):
    """An EXPLORE entry as a plan change (``nested_mlp.plan.override``): None forces the pointer tiles; else the TMA
    tiles with each named config updated (plan-wide keys replaced)."""
    def change(p):
        if over is None:
            return p.replace(tma=False)
        return p.replace(tma=True, **{k: dict(getattr(p, k), **v) if isinstance(v, dict) else v
                                      for k, v in over.items()})
    return change


def host_cost(H, inter, gen):
    """Host time per eager forward call (no sync in the loop, so the GPU queue absorbs the kernels), and where it
    goes (cProfile, top functions by own time)."""
    import cProfile
    import io
    import pstats

    out = []
    for T in (1, 16, 256, 2048):
        w = _widths("uniform", T, inter, gen)
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        ws = [torch.randn(*s, device="cuda", dtype=torch.bfloat16) * 0.02 for s in ((inter, H), (inter, H), (H, inter))]

        def flex(x=x, ws=ws, w=w):
            return nested_mlp(x, ws[1], ws[2], w, gate_weight=ws[0], check_widths=False)

        def dense(x=x, ws=ws):
            return _mlp(x, ws[0], ws[1], ws[2])

        with torch.no_grad():
            for name, fn in (("flextron", flex), ("dense", dense)):
                for _ in range(5):
                    fn()
                torch.cuda.synchronize()
                n = 50
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                host_us = (time.perf_counter() - t0) / n * 1e6
                torch.cuda.synchronize()
                row = {"T": T, "provider": name, "host_us_per_call": host_us}
                if name == "flextron":
                    prof = cProfile.Profile()
                    prof.enable()
                    for _ in range(n):
                        fn()
                    prof.disable()
                    torch.cuda.synchronize()
                    buf = io.StringIO()
                    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
                    row["profile"] = buf.getvalue()[-4000:]
                out.append(row)
                print({k: v for k, v in row.items() if k != "profile"}, flush=True)
                if T in (1, 256) and name == "flextron":
                    print(row["profile"], flush=True)
    return out


def kernel_times(H, inter, gen, T=256, over=None):
    """GPU time per kernel of one forward (torch.profiler), per width mix; ``over``: an EXPLORE plan change."""
    with nm_plan.override(plan_change(over)) if over is not None else contextlib.nullcontext():
        return _kernel_times(H, inter, gen, T)


def backward_kernel_times(H, inter, gen, T=8192, mixes=("uniform", "skewed", "full")):
    """GPU time per kernel name (torch.profiler) of a forward and of a forward+backward, per width mix: the
    backward's share of each kernel is the difference."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    ws = [torch.randn(*s, device="cuda", dtype=torch.bfloat16, requires_grad=True) for s in ((inter, H), (inter, H),
                                                                                           (H, inter))]
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    for mix in mixes:
        w = _widths(mix, T, inter, gen)
        row = {}
        for name, bwd in (("fwd", False), ("fwd_bwd", True)):
            def step(bwd=bwd, w=w):
                y = nested_mlp(x, ws[1], ws[2], w, gate_weight=ws[0], check_widths=False)
                if bwd:
                    y.backward(dy)
                for p in ws + [x]:
                    p.grad = None
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    step()
                torch.cuda.synchronize()
            row[name] = {e.key[:50]: round(e.device_time_total / 5, 1) for e in prof.key_averages()
                         if e.device_time_total > 0}
        out[mix] = row
        print(T, mix, row, flush=True)
    return out


def _kernel_times(H, inter, gen, T):
    from torch.profiler import ProfilerActivity, profile

    out = {}
    ws = [torch.randn(*s, device="cuda", dtype=torch.bfloat16) * 0.02 for s in ((inter, H), (inter, H), (H, inter))]
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    for mix in ("uniform", "full"):
        w = _widths(mix, T, inter, gen)
        with torch.no_grad():
            for _ in range(3):
                nested_mlp(x, ws[1], ws[2], w, gate_weight=ws[0], check_widths=False)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(20):
                    nested_mlp(x, ws[1], ws[2], w, gate_weight=ws[0], check_widths=False)
                torch.cuda.synchronize()
        out[mix] = {e.key[:60]: e.device_time_total / 20 for e in prof.key_averages()}
        print(T, mix, {k: round(v, 1) for k, v in out[mix].items()}, flush=True)
    return out


def explore(H, inter, gen, sizes=(256, 1024, 2048, 8192), mix="uniform", names=None):
    rows = []
    for T in sizes:
        w = _widths(mix, T, inter, gen)
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        ws = [torch.randn(*s, device="cuda", dtype=torch.bfloat16) * 0.02 for s in ((inter, H), (inter, H), (H, inter))]
        dy = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        if T <= 1024:  # the reference: cuBLAS dense MLP at full width, graph-timed
            with torch.no_grad():
                g = _graph(lambda x=x, ws=ws: _mlp(x, *ws))
                rows.append({"T": T, "mix": mix, "variant": "dense", "fwd_graph_ms": _bench(g.replay)})
                del g
            for p in ws + [x]:
                p.requires_grad_(True)
            g = _graph(lambda x=x, ws=ws, dy=dy: torch.autograd.grad(_mlp(x, *ws), ws + [x], dy))
            rows[-1]["fwd_bwd_graph_ms"] = _bench(g.replay)
            del g
            for p in ws + [x]:
                p.requires_grad_(False)
            print(rows[-1], flush=True)
        for name, over in EXPLORE.items():
            if names and name not in names:
                continue
            row = {"T": T, "mix": mix, "variant": name}

            def run(x=x, ws=ws, w=w):
                return nested_mlp(x, ws[1], ws[2], w, gate_weight=ws[0], check_widths=False)
            try:
                stack = contextlib.ExitStack()
                stack.enter_context(nm_plan.override(plan_change(over)))
                with torch.no_grad():
                    row["fwd_ms"] = _bench(run)
                    if T <= 1024:  # eager is host-bound here: the GPU time from a graph replay
                        g = _graph(run)
                        row["fwd_graph_ms"] = _bench(g.replay)
                        del g
                for p in ws + [x]:
                    p.requires_grad_(True)
                row["fwd_bwd_ms"] = _bench(lambda run=run, dy=dy: run().backward(dy), grad_to_none=ws + [x])
                if T <= 1024:  # the same from a graph replay (autograd captured whole)
                    g = _graph(lambda run=run, dy=dy, ws=ws, x=x: torch.autograd.grad(run(), ws + [x], dy))
                    row["fwd_bwd_graph_ms"] = _bench(g.replay)
                    del g
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            finally:
                stack.close()
                for p in ws + [x]:
                    p.requires_grad_(False)
                    p.grad = None
            rows.append(row)
            print(row, flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--explore", action="store_true", help="the variant sweep (the default mode)")
    ap.add_argument("--host", action="store_true", help="only measure the host cost of a call")
    ap.add_argument("--profile-bwd", type=int, default=0, metavar="T", help="only per-kernel times of fwd and "
                    "fwd+bwd at T tokens")
    ap.add_argument("--explore-t", default="256,1024,2048,8192", help="token counts for the sweep")
    ap.add_argument("--explore-mix", default="uniform", help="width mixes for the sweep (comma-separated)")
    ap.add_argument("--explore-only", default="", help="EXPLORE variants to run (comma-separated; default all)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("explore_nested_mlp needs a CUDA GPU")
    path, result = new_result(args.out)
    gen = torch.Generator().manual_seed(0)
    if args.host:
        H, inter = {**MODELS, **EXTRA_MODELS}[args.models.split(",")[0]]
        result["host"] = host_cost(H, inter, gen)
        with open(path.replace("nested_mlp_", "nested_mlp_host_"), "w") as f:
            json.dump(result, f, indent=1)
        return
    if args.profile_bwd:
        # Per EXPLORE variant named in --explore-only (default: the plan as it is), side by side in one run.
        result["kernels"] = {}
        for name in [n for n in args.explore_only.split(",") if n] or ["base"]:
            stack = contextlib.ExitStack()
            if name != "base":
                stack.enter_context(nm_plan.override(plan_change(EXPLORE[name])))
            try:
                for model in args.models.split(","):
                    print("variant", name, model, flush=True)
                    result["kernels"].setdefault(name, {})[model] = backward_kernel_times(
                        *{**MODELS, **EXTRA_MODELS}[model], gen, args.profile_bwd)
            except Exception as e:  # e.g. a variant past the shared memory: recorded, the others still run
                result["kernels"].setdefault(name, {})["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                print(name, "failed:", result["kernels"][name]["error"], flush=True)
            finally:
                stack.close()
        with open(path.replace("nested_mlp_", "nested_mlp_profile_bwd_"), "w") as f:
            json.dump(result, f, indent=1)
        return
    # The variant sweep.
    result["kernel_us_T256"], result["explore"] = {}, []
    names = [n for n in args.explore_only.split(",") if n]
    for model in args.models.split(","):
        H, inter = {**MODELS, **EXTRA_MODELS}[model]
        result["kernel_us_T256"][model] = kernel_times(H, inter, gen)
        if "route1" in names:  # the routing's one launch against the three it replaces, kernel by kernel
            print("kernel times, route1", flush=True)
            result.setdefault("kernel_us_T256_route1", {})[model] = kernel_times(H, inter, gen,
                                                                                 over=EXPLORE["route1"])
        for mix in args.explore_mix.split(","):
            rows = explore(H, inter, gen, tuple(int(t) for t in args.explore_t.split(",")), mix, names)
            result["explore"] += [dict(r, model=model) for r in rows]
    with open(path.replace("nested_mlp_", "nested_mlp_explore_"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
