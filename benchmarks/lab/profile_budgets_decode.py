"""Where the host time of an eager decode step goes with per-request budgets, against the same batch at full width.

Greedy ``generate`` (dynamic cache) of a Llama-shaped model with random weights, 16 sequences at budgets
25/50/75/100% (four each) and at full width: ms per decode step for each (best of ``--repeats``), then a cProfile
of the budgets' steps (the default decode policy), by own time. A GPU step whose host time exceeds its GPU time
is paced by the host, so the profile shows what to cut.

    python benchmarks/lab/profile_budgets_decode.py [--layers 8] [--new-tokens 32] [--top 30]
    python benchmarks/lab/profile_budgets_decode.py --device cpu --hidden 64 --layers 2   # a smoke run
    python benchmarks/lab/profile_budgets_decode.py --variants masked-mlp,masked-attn,masked   # dense A/B

Every decode policy (``FLEXTRON_BUDGET_DECODE``) is timed; the variants swap the kernels' calls under ``kernels``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_end_to_end as e2e  # its model builder and budgets

import flextron
import flextron.layers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_ms(fm, ids, new_tokens: int, repeats: int, device: torch.device, **kw) -> float:
    """ms per decode step: (generate of ``new_tokens`` - generate of 1) / (new_tokens - 1), best of ``repeats``."""
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
               attention_mask=torch.ones_like(ids), **kw)
    one = dict(gen, max_new_tokens=1, min_new_tokens=1)
    best = float("inf")
    with torch.no_grad():
        fm.generate(ids, **gen)  # warm-up: kernels compiled and tuned, graphs of repeated calls captured
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            fm.generate(ids, **one)
            _sync(device)
            t1 = time.perf_counter()
            fm.generate(ids, **gen)
            _sync(device)
            t2 = time.perf_counter()
            best = min(best, ((t2 - t1) - (t1 - t0)) / (new_tokens - 1) * 1e3)
    return best


def _masked_mlp(x, up_weight, down_weight, widths, *, gate_weight=None, up_bias=None, down_bias=None,
                activation="silu", check_widths=True):
    """Every token at the weights' full width (cuBLAS), each token's neurons past its width zeroed before the down
    projection: the same weight traffic as the grouped kernel, the launches of a dense MLP plus three."""
    import torch.nn.functional as F

    keep = torch.arange(up_weight.shape[0], device=x.device) < widths[..., None]
    h = F.linear(x, up_weight, up_bias)
    a = F.silu(F.linear(x, gate_weight)) * h if gate_weight is not None else F.gelu(h)
    return F.linear(a * keep, down_weight, down_bias)


def _masked_decode(q, k, v, lens, heads, *, scale, validate=True):
    """SDPA over every head of the cache (what the full width runs), the heads past each budget zeroed after."""
    import torch.nn.functional as F

    o = F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale, enable_gqa=q.shape[1] != k.shape[1])[:, :, 0]
    return o * (torch.arange(q.shape[1], device=q.device)[None, :] < heads[:, None])[..., None]


VARIANTS = ("masked-mlp", "masked-attn", "masked")


@contextlib.contextmanager
def _variant(name: str):
    import flextron.attention
    import flextron.mlp

    if name not in VARIANTS:
        raise SystemExit(f"--variants: {name!r} is not one of {', '.join(VARIANTS)}")
    import flextron.layers

    saved = flextron.mlp.nested_mlp, flextron.attention.elastic_attention_decode, flextron.layers.BUDGET_DECODE
    flextron.layers.BUDGET_DECODE = "kernels"  # the kernels' calls, swapped below
    if name in ("masked-mlp", "masked"):
        flextron.mlp.nested_mlp = _masked_mlp
    if name in ("masked-attn", "masked"):
        flextron.attention.elastic_attention_decode = _masked_decode
    try:
        yield
    finally:
        (flextron.mlp.nested_mlp, flextron.attention.elastic_attention_decode,
         flextron.layers.BUDGET_DECODE) = saved


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--variants", default="", help="comma list of " + ", ".join(VARIANTS) + ": the budgets' step "
                    "timed again with the MLP and/or attention's decode swapped for masked dense calls")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    h = args.hidden
    shape = dict(hidden_size=h, intermediate_size=4 * h, num_hidden_layers=args.layers,
                 num_attention_heads=max(4, h // 64), num_key_value_heads=max(2, h // 256), vocab_size=32000)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    fm = flextron.FlextronModel.from_hf(e2e.build_model(shape, device, dtype=dtype), e2e.make_space())
    ids = torch.randint(1, shape["vocab_size"], (len(e2e.BUDGETS), args.prompt_len),
                        generator=torch.Generator().manual_seed(0)).to(device)
    budgets = list(e2e.BUDGETS)
    full = step_ms(fm, ids, args.new_tokens, args.repeats, device)
    default = flextron.layers.BUDGET_DECODE
    mixed = step_ms(fm, ids, args.new_tokens, args.repeats, device, budgets=budgets)
    print(f"{args.layers} layers, hidden {h}, batch {len(budgets)}: full width {full:.3f} ms/step, budgets "
          f"{mixed:.3f} ms/step ({(mixed - full) / args.layers * 1e3:+.1f} us per layer; decode policy {default})")
    for policy in (p for p in flextron.layers.DECODE_POLICIES if p != default):
        flextron.layers.BUDGET_DECODE = policy
        try:
            ms = step_ms(fm, ids, args.new_tokens, args.repeats, device, budgets=budgets)
        finally:
            flextron.layers.BUDGET_DECODE = default
        print(f"  budgets, decode policy {policy}: {ms:.3f} ms/step ({(ms - full) / args.layers * 1e3:+.1f} us per "
              f"layer vs full)")
    for name in args.variants.split(",") if args.variants else []:
        with _variant(name):
            ms = step_ms(fm, ids, args.new_tokens, args.repeats, device, budgets=budgets)
        print(f"  budgets, {name}: {ms:.3f} ms/step ({(ms - full) / args.layers * 1e3:+.1f} us per layer vs full)")
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0,
               attention_mask=torch.ones_like(ids), budgets=budgets)
    print_profile(lambda: fm.generate(ids, **gen), device, args.top)
    return 0


def print_profile(call, device: torch.device, top: int) -> None:
    """A cProfile of ``call()`` (no autograd, the GPU drained at the end), the ``top`` functions by own time."""
    prof = cProfile.Profile()
    with torch.no_grad():
        prof.enable()
        call()
        _sync(device)
        prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


if __name__ == "__main__":
    sys.exit(main())
