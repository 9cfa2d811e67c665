"""``flextron route``: train latency-aware routers for a checkpoint and save them with it."""

from __future__ import annotations

import torch

from .. import data  # called through the module, so a test can substitute its functions
from ..budget import attach_router, attach_table, calibrate_adaptive, routing
from ..latency import LatencyTable
from ..model import FlextronModel
from ..router import DynamicRouter, RouterTrainConfig, StaticRouter, train_routers
from . import args as c
from .args import UsageError, check_vocab, load_tokenizer, user_input


def add_route_parser(subparsers):
    """``flextron route``: train static and/or dynamic routers for a checkpoint and save them with it."""
    p = subparsers.add_parser(
        "route", help="train latency-aware routers (through a surrogate) for a flextron checkpoint",
        description="Train a static router (latency target -> per-layer widths) and/or an input-adaptive one for "
                    "a flextron checkpoint, on text tokenised with the checkpoint's own tokenizer (or --tokenizer), "
                    "and save them with the model.")
    p.add_argument("checkpoint", type=c.flextron_checkpoint,
                   help="a flextron checkpoint folder (ranked and, ideally, elastically trained)")
    p.add_argument("--table", default=None, type=c.existing_file,
                   help="latency table JSON from `flextron profile` (default: the one stored in the checkpoint)")
    p.add_argument("--text", nargs="*", default=None, type=c.existing_file,
                   help="training text files, stories split on <|endoftext|> (default: the bundled TinyStories "
                        "excerpt)")
    p.add_argument("--tokenizer", default=None, type=c.tokenizer_dir,
                   help="tokenizer folder (default: the tokenizer saved in the checkpoint; there is no other default)")
    p.add_argument("--kind", choices=("static", "dynamic", "both"), default="both",
                   help="routers to train; one of %(choices)s (default %(default)s)")
    p.add_argument("--seq-len", type=c.int_at_least(2), default=256,
                   help="tokens per training window; int >= 2 (default %(default)s)")
    p.add_argument("--sm-steps", type=c.nonnegative_int, default=400,
                   help="steps of the surrogate-model phase; int >= 0 (default %(default)s)")
    p.add_argument("--sm-warmup", type=c.nonnegative_int, default=60,
                   help="surrogate-only steps at its start; int >= 0 (default %(default)s)")
    p.add_argument("--joint-steps", type=c.nonnegative_int, default=120,
                   help="steps of the joint phase (surrogate dropped); int >= 0 (default %(default)s)")
    p.add_argument("--batch-size", type=c.positive_int, default=8,
                   help="sequences per step, each with its own target; int >= 1 (default %(default)s)")
    p.add_argument("--lr-model", type=c.nonnegative_float, default=0.0,
                   help="> 0: fine-tune the LLM jointly in the last phase at this learning rate; >= 0 "
                        "(default %(default)s)")
    p.add_argument("--lam", type=c.nonnegative_float, default=RouterTrainConfig.lam,
                   help="weight of the latency loss; >= 0 (default %(default)s)")
    p.add_argument("--calibrate-windows", type=c.nonnegative_int, default=16,
                   help="text windows on which the dynamic router's realised latency is calibrated; int >= 0, "
                        "0: none (default %(default)s)")
    p.add_argument("--out", default=None, type=c.checkpoint_destination,
                   help="write the routed checkpoint here: a new path, an empty directory or a flextron checkpoint, "
                        "whose own files are replaced (default: in place)")
    p.set_defaults(func=run_route)
    return p


def run_route(args) -> int:
    """``flextron route``. Bad input raises :class:`flextron.cli.args.UsageError` before any training."""
    if args.sm_steps + args.joint_steps < 1:
        raise UsageError("--sm-steps and --joint-steps are both 0: nothing to train")
    tok, tok_dir = load_tokenizer(args.checkpoint, args.tokenizer)  # before loading the model: fails fast
    with user_input():
        fm = FlextronModel.from_pretrained(args.checkpoint)
    check_vocab(tok, fm.model.get_input_embeddings().num_embeddings, tokenizer_source=tok_dir,
                model_source=args.checkpoint)
    if getattr(fm, "tokenizer", None) is None:
        fm.tokenizer = tok  # saved with the routers, so later commands find it in the checkpoint
    if torch.cuda.is_available():
        fm.cuda()
    with user_input():
        if args.table:
            attach_table(fm, LatencyTable.load(args.table))
        table = routing(fm).table
    if table is None:
        raise UsageError(f"route needs a latency table: pass --table or run `flextron profile {args.checkpoint} "
                         f"--out TABLE --attach` first")
    with user_input():
        stories = [s for f in (args.text or [data.TINYSTORIES_EXCERPT]) for s in data.read_stories(f)]
        windows = data.token_windows(tok, stories, args.seq_len)
    cfg = RouterTrainConfig(sm_steps=args.sm_steps, sm_warmup=args.sm_warmup, joint_steps=args.joint_steps,
                            batch_size=args.batch_size, lr_model=args.lr_model, lam=args.lam)
    mc = [fm.mlp_choices(i) for i in range(fm.num_layers)]
    hc = [fm.head_choices(i) for i in range(fm.num_layers)]
    kinds = ("static", "dynamic") if args.kind == "both" else (args.kind,)
    for kind in kinds:
        router = StaticRouter(mc, hc) if kind == "static" else DynamicRouter(mc, hc, fm.config.hidden_size)
        log = train_routers(fm, router, table, windows, cfg, progress=True)
        last = log[-1]
        print(f"{kind} router: final LM loss {last['lm_loss']:.3f}, "
              f"expected - target latency {last['expected_minus_target']:+.3f}")
        attach_router(fm, router)
        if kind == "dynamic" and args.calibrate_windows > 0:
            n = min(args.calibrate_windows, windows.shape[0])
            curve = calibrate_adaptive(fm, list(windows[:n].split(8)))
            print("dynamic router calibrated on", n, "windows: router input -> realised latency fraction",
                  ", ".join(f"{t:.2f}->{f:.3f}" for t, f in curve[::8]))
    fm.save_pretrained(args.out or args.checkpoint, overwrite=True)
    print(f"saved routers and table with the model in {args.out or args.checkpoint}")
    return 0
