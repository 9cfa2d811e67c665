"""``flextron profile``: measure (and optionally validate) a latency table of a checkpoint or a random Llama."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .. import latency  # called through the module, so a test can substitute its functions
from ..budget import attach_table, save_routing
from ..model import FlextronModel
from . import args as c
from .args import LLAMA_RANDOM, UsageError, check_device_available, user_input


def add_profile_parser(subparsers):
    """``flextron profile``: measure a latency table for a checkpoint (or a random Llama-shaped model)."""
    p = subparsers.add_parser(
        "profile", help="measure a per-layer latency table of a flextron checkpoint on this device",
        description="Measure every layer's MLP at every width and attention at every head count of a flextron "
                    "checkpoint (or of a random Llama-shaped model) on this device and write the latency table "
                    "as JSON. Inputs are random: no tokenizer is used.")
    p.add_argument("model", type=c.checkpoint_or_llama_random,
                   help="a flextron checkpoint folder, or 'llama-random:H,I,HEADS,LAYERS[,KV_HEADS]' (a Llama-shaped "
                        "model with random weights: hidden size, MLP size, query heads, layers, KV heads; positive "
                        "integers, HEADS dividing H into an even head size, KV_HEADS dividing HEADS)")
    p.add_argument("--out", required=True, type=c.output_file, help="the JSON table to write")
    p.add_argument("--phase", choices=latency.PHASES, default="prefill",
                   help="prefill: batch x seq-len new tokens; decode: one new token per sequence after seq-len "
                        "cached ones; one of %(choices)s (default %(default)s)")
    p.add_argument("--batch-size", type=c.positive_int, default=8,
                   help="sequences per timed forward; int >= 1 (default %(default)s)")
    p.add_argument("--seq-len", type=c.positive_int, default=256,
                   help="tokens per sequence (prefill) or cached tokens (decode); int >= 1 (default %(default)s)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="one of %(choices)s (default: bfloat16 on CUDA, float32 on a CPU)")
    p.add_argument("--device", type=c.device, default=None,
                   help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    p.add_argument("--warmup", type=c.nonnegative_int, default=3,
                   help="untimed rounds before timing; int >= 0 (default %(default)s)")
    p.add_argument("--repeats", type=c.positive_int, default=10,
                   help="timed rounds whose median is kept; int >= 1 (default %(default)s)")
    p.add_argument("--graphs", action="store_true",
                   help="time CUDA-graph replays (device time, as a graph-captured decode step sees it); on a CPU "
                        "the table is timed eagerly and says so")
    p.add_argument("--validate", type=c.nonnegative_int, default=0,
                   help="also validate the table on this many random subnets; int >= 0 (default %(default)s)")
    p.add_argument("--attach", action="store_true",
                   help="store the table in the checkpoint as well (not with llama-random)")
    p.set_defaults(func=run_profile)
    return p


def random_llama(spec: str, *, vocab_size: int = 4096, space=None) -> FlextronModel:
    """A Llama-shaped FlextronModel with random weights from ``'H,I,HEADS,LAYERS[,KV_HEADS]'``."""
    parts = [int(v) for v in spec.split(",")]
    if len(parts) not in (4, 5):
        raise ValueError(f"model spec must be 'H,I,HEADS,LAYERS[,KV_HEADS]', got {spec!r}")
    h, inter, heads, layers = parts[:4]
    kv = parts[4] if len(parts) == 5 else heads
    cfg = LlamaConfig(hidden_size=h, intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv,
                      num_hidden_layers=layers, vocab_size=vocab_size, max_position_embeddings=8192)
    torch.manual_seed(0)
    return FlextronModel.from_hf(LlamaForCausalLM(cfg).eval(), space)


def run_profile(args) -> int:
    """``flextron profile``. Bad input raises :class:`flextron.cli.args.UsageError` before any measurement."""
    random_model = args.model.startswith(LLAMA_RANDOM)
    if args.attach and random_model:
        raise UsageError("--attach stores the table in a checkpoint: give a flextron checkpoint, not llama-random")
    if args.device:
        check_device_available(args.device)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    with user_input():
        if random_model:
            fm = random_llama(args.model.split(":", 1)[1])
        else:
            fm = FlextronModel.from_pretrained(args.model)
        fm.to(device=device, dtype=dtype)
    table = latency.profile(fm, batch_size=args.batch_size, seq_len=args.seq_len, phase=args.phase,
                            warmup=args.warmup, repeats=args.repeats, graphs=args.graphs)
    if args.validate:
        table.extra["validation"] = latency.validate(fm, table, args.validate)
        v = table.extra["validation"]
        print(f"validation over {len(v['rows'])} subnets: median |error| {v['median_abs_rel_error']:.1%}, "
              f"worst {v['max_abs_rel_error']:.1%}")
    table.save(args.out)
    print(f"wrote {args.out}: {table.describe()}")
    span = 1 - table.min_ms() / table.full_ms()
    if span < 0.2:
        print(f"warning: the smallest subnet is predicted only {span:.0%} faster than the full model: at this shape "
              f"the model is launch- or overhead-bound and widths barely change latency; profile with more tokens")
    if args.attach:
        attach_table(fm, table)
        save_routing(fm, args.model)
    return 0
