"""``flextron demo``, the README's main job.

It converts the bundled stories260K (a real pretrained Llama with grouped-query attention) to a Flextron model, ranks
its neurons and heads on bundled TinyStories text, and prints width, parameters and perplexity of uniform
sub-networks on held-out bundled text.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers.utils import logging as hf_logging

from ..data import load_stories260k, perplexity, progress_bar, read_stories, token_windows
from ..model import FlextronModel
from .args import fractions, int_at_least, positive_int


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``demo`` to a ``flextron`` command's subparsers."""
    p = subparsers.add_parser("demo", help="rank the bundled stories260K and evaluate uniform sub-networks",
                              description="Convert the bundled stories260K to a Flextron model, rank its neurons and "
                                          "heads on bundled TinyStories text and print width, parameters and "
                                          "perplexity of uniform sub-networks on held-out bundled text (uses "
                                          "stories260K's own tokenizer).")
    # Sizes fit the 2-minute budget on a 2-core CPU, where every projection runs in the Triton interpreter.
    p.add_argument("--seq-len", type=int_at_least(2), default=128,
                   help="tokens per window; int >= 2 (default %(default)s)")
    p.add_argument("--windows", type=positive_int, default=8,
                   help="windows for ranking and for evaluation; int >= 1 (default %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=4,
                   help="windows per forward; int >= 1 (default %(default)s)")
    p.add_argument("--widths", type=fractions, default=(0.25, 0.5, 0.75, 1.0),
                   help="uniform widths to evaluate, comma-separated fractions in (0, 1] (default 0.25,0.5,0.75,1)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run_demo)
    return p


def run_demo(args: argparse.Namespace) -> int:
    """``flextron demo``."""
    hf_logging.disable_progress_bar()  # one progress bar: ours
    t0 = time.perf_counter()
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_stories260k()
    fm = FlextronModel.from_hf(model.to(device))
    stories = read_stories()
    half = len(stories) // 2  # rank on the first half of the bundled text, evaluate on the second
    calib = token_windows(tokenizer, stories[:half], args.seq_len, args.windows).to(device)
    evals = token_windows(tokenizer, stories[half:], args.seq_len, args.windows).to(device)
    widths = list(args.widths)
    n_eval_batches = len(evals.split(args.batch_size))
    print(f"stories260K ({fm.num_parameters():,} parameters, {fm.num_layers} layers, "
          f"MLP {fm.mlp_blocks[0].full_width}, heads {fm.attention_blocks[0].num_heads} "
          f"in {fm.attention_blocks[0].num_kv_heads} KV groups) on {device}")
    print(f"ranking on {calib.numel():,} tokens, perplexity on {evals.numel():,} held-out tokens "
          f"of bundled TinyStories text")
    calib_batches = list(calib.split(args.batch_size))
    bar = progress_bar(len(calib_batches) + n_eval_batches * len(widths), "flextron demo", disable=args.no_progress)
    bar.set_postfix_str("ranking")

    def counted(items):
        for b in items:
            yield b
            bar.update(1)

    fm.rank(counted(calib_batches))
    rows = []
    for w in widths:
        subnet = fm.uniform_subnet(mlp=w, heads=w)
        fm.set_subnet(subnet)
        bar.set_postfix_str(f"width {w:.0%}")
        ppl = perplexity(fm, evals, args.batch_size, progress=bar)
        rows.append((w, subnet.mlp[0], subnet.heads[0], fm.num_parameters(), ppl))
    bar.close()
    fm.set_subnet(None)
    print(f"{'width':>6} {'MLP':>5} {'heads':>5} {'parameters':>11} {'perplexity':>11}")
    for w, mlp, heads, params, ppl in rows:
        print(f"{w:>6.0%} {mlp:>5} {heads:>5} {params:>11,} {ppl:>11.2f}")
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0

