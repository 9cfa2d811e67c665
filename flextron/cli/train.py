"""``flextron train``: elastic continued training of a Hugging Face model or a flextron checkpoint."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

import torch.distributed as dist

from .. import train as training
from ..distributed import init_distributed
from ..space import ElasticSpace
from ..tokens import mix, open_cache, tokenize_files, tokenizer_fingerprint
from ..train import TrainConfig, Trainer, load_model
from . import args as c
from .args import UsageError, check_device_available, check_vocab, config_vocab_size, load_tokenizer, user_input


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``train`` to a ``flextron`` command's subparsers."""
    p = subparsers.add_parser(
        "train", help="elastic continued training of a HF model or flextron checkpoint (torchrun for many GPUs)",
        description=training.__doc__.splitlines()[0] + " --model takes a Hugging Face model folder (made elastic and "
        "ranked on the training text) or a flextron checkpoint; the trained model is written to OUT/model with its "
        "tokenizer.")
    p.add_argument("--model", required=True, type=c.model_dir,
                   help="a flextron checkpoint or a Hugging Face model folder")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", nargs="+", type=c.existing_file,
                        help="text files (documents separated by <|endoftext|>)")
    source.add_argument("--tokens-cache", default=None,
                        help="a prepared token cache folder instead of --data, e.g. a corpus written by `flextron "
                             "sample-corpus`; made with the model's tokenizer (checked)")
    p.add_argument("--mix-data", nargs="+", type=c.existing_file, default=None,
                   help="text files whose training split (the --val-fraction rule) makes up --mix-share of every "
                        "batch, e.g. real text mixed into a --tokens-cache corpus the parent sampled; tokenised into "
                        "--cache (their held-out split is never read)")
    p.add_argument("--mix-share", type=c.unit_interval, default=None,
                   help="share of every batch from --mix-data; in (0, 1) (required with --mix-data)")
    p.add_argument("--out", required=True, help="run directory: metrics.jsonl, checkpoints/, model/")
    p.add_argument("--tokenizer", default=None, type=c.tokenizer_dir,
                   help="tokenizer folder (default: the tokenizer saved in --model; there is no other default)")
    p.add_argument("--cache", default=None, help="token cache directory (default: under ~/.cache/flextron)")
    p.add_argument("--val-fraction", type=c.holdout_fraction, default=0.1,
                   help="last fraction of documents held out for validation; in [0, 1) (default %(default)s)")
    p.add_argument("--mlp", type=c.fractions, default=None,
                   help="MLP widths of the space, comma-separated fractions in (0, 1], e.g. 0.25,0.5,1 "
                        "(default: a checkpoint's own space; for a HF model every multiple of the granularity)")
    p.add_argument("--heads", type=c.fractions, default=None,
                   help="head counts of the space, comma-separated fractions in (0, 1] (default: a checkpoint's "
                        "own space; for a HF model every whole number of KV groups)")
    p.add_argument("--rank-windows", type=c.nonnegative_int, default=64,
                   help="training windows that rank a HF model's neurons and heads; int >= 0, 0: no ranking "
                        "(default %(default)s)")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the newest checkpoint in --out, or from the checkpoint directory given "
                        "(default: a fresh run, refused when --out already holds checkpoints)")
    # Each TrainConfig field's flag: (type, help); choice fields list TrainConfig's allowed values.
    flags = {
        "steps": (c.positive_int, "optimizer steps of the schedule; int >= 1"),
        "batch_size": (c.positive_int, "blocks per rank and micro-batch; int >= 1"),
        "grad_accum": (c.positive_int, "micro-batches per optimizer step; int >= 1"),
        "seq_len": (c.int_at_least(2), "tokens per block; int >= 2, at most the model's positions"),
        "lr": (c.positive_float, "peak learning rate; > 0"),
        "min_lr_ratio": (c.unit_interval, "final learning rate as a fraction of --lr (cosine decay); in [0, 1]"),
        "warmup": (c.nonnegative_int, "linear warm-up steps; int >= 0"),
        "weight_decay": (c.nonnegative_float, "AdamW weight decay of weight matrices; >= 0"),
        "clip": (c.nonnegative_float, "gradient-norm clip; >= 0, 0: no clipping"),
        "sampling": (None, "subnets per step: full + smallest + k random (sandwich), or the full model only"),
        "k_random": (c.nonnegative_int, "random subnets per step besides the full and the smallest; int >= 0"),
        "full_weight": (c.positive_float, "weight of the full model's loss in the sandwich sum; > 0"),
        "random_kind": (None, "how random subnets are drawn: each layer independently, one quantile for all "
                              "layers, or alternating"),
        "distill": (None, "distillation teacher: none, the full model of the same step, or a frozen parent copy"),
        "alpha": (c.unit_interval, "weight of the distillation term; in [0, 1]"),
        "temperature": (c.positive_float, "distillation temperature; > 0"),
        "data_mode": (None, "how training blocks are drawn"),
        "seed": (int, "seed of subnet sampling and data order; int"),
        "eval_every": (c.nonnegative_int, "evaluate every N steps; int >= 0, 0: only at the start and the end"),
        "eval_windows": (c.nonnegative_int, "validation windows per evaluation; int >= 0, 0: the whole split"),
        "eval_batch_size": (c.positive_int, "windows per evaluation forward; int >= 1"),
        "save_every": (c.nonnegative_int, "save a checkpoint every N steps; int >= 0, 0: only at the end"),
        "keep_checkpoints": (c.nonnegative_int, "newest checkpoints kept; int >= 0, 0: all"),
        "log_every": (c.nonnegative_int, "log every N steps; int >= 0, 0: every step"),
        "stop_at": (c.positive_int, "stop (after saving) at this step while the schedule still runs to --steps; "
                                    "int >= 1, None: at --steps"),
        "parallel": (None, "data parallelism under torchrun"),
        "device": (None, "auto: this rank's GPU when there is one, else the CPU"),
    }
    choices = {"sampling": ("sandwich", "full"), "distill": ("none", "inplace", "parent"),
               "random_kind": ("layerwise", "uniform", "mixed"), "data_mode": ("random", "sequential"),
               "parallel": ("none", "ddp", "fsdp"), "device": ("auto", "cuda", "cpu")}
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        if f.name in ("progress", "bf16", "betas", "eval_widths"):
            continue
        default = getattr(defaults, f.name)
        typ, text = flags.get(f.name, (type(default) if default is not None else str, f.name.replace("_", " ")))
        kwargs = {"choices": choices[f.name]} if f.name in choices else {"type": typ}
        if f.name in choices:
            text += "; one of %(choices)s"
        p.add_argument("--" + f.name.replace("_", "-"), default=default, help=text + " (default %(default)s)",
                       **kwargs)
    p.add_argument("--betas", type=c.betas, default=defaults.betas,
                   help="AdamW betas, two comma-separated numbers in [0, 1) (default 0.9,0.99)")
    p.add_argument("--eval-widths", type=c.fractions, default=defaults.eval_widths,
                   help="uniform widths evaluated on the validation split, comma-separated fractions in (0, 1] "
                        "(default 0.25,0.5,0.75,1)")
    p.add_argument("--no-bf16", action="store_true", help="no bfloat16 autocast on CUDA")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run_train)
    return p


def check_cache_tokenizer(data, tokenizer, tok_dir) -> None:
    """Raise :class:`UsageError` unless the prepared cache ``data`` was tokenised with ``tokenizer``'s vocabulary."""
    have = (data.meta.get("tokenizer") or {})
    mine = tokenizer_fingerprint(tokenizer)
    if have.get("vocab_sha256") != mine["vocab_sha256"]:
        raise UsageError(f"the token cache {str(data.path)!r} was made with another tokenizer "
                         f"({have.get('name_or_path')!r}, {have.get('vocab_size')} tokens, vocabulary sha256 "
                         f"{str(have.get('vocab_sha256'))[:12]}) than the model's ({str(tok_dir)!r}, "
                         f"{mine['vocab_size']} tokens, {mine['vocab_sha256'][:12]}): its ids would mean other "
                         f"tokens; make the cache with this model's tokenizer")


def run_train(args: argparse.Namespace) -> int:
    """``flextron train``. Bad input raises :class:`flextron.cli.args.UsageError` before any training or writing."""
    names = {f.name for f in fields(TrainConfig)}
    with user_input():
        cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names and k not in ("bf16", "progress")},
                          bf16=not args.no_bf16, progress=not args.no_progress)
    if cfg.device == "cuda":
        check_device_available("cuda")
    if args.tokens_cache is not None and args.cache is not None and args.mix_data is None:
        raise UsageError("--cache is where --data is tokenised; with --tokens-cache there is nothing to tokenise")
    if (args.mix_data is None) != (args.mix_share is None):
        raise UsageError("--mix-data and --mix-share go together: the text to mix in and its share of every batch")
    if args.mix_share is not None and not 0 < args.mix_share < 1:
        raise UsageError(f"--mix-share must be in (0, 1), got {args.mix_share}")
    if args.mix_data is not None and cfg.data_mode != "random":
        raise UsageError("--mix-data draws random blocks: it needs --data-mode random")
    mix_cache = None if args.cache is None else str(Path(args.cache) / "mix")  # never --data's own cache folder
    tokenizer, tok_dir = load_tokenizer(args.model, args.tokenizer)
    vocab = config_vocab_size(args.model)  # cheap check before tokenising; the embedding is checked after loading
    if vocab is not None:
        check_vocab(tokenizer, vocab, tokenizer_source=tok_dir, model_source=args.model)
    with user_input():
        space = None
        if args.mlp is not None or args.heads is not None:
            space = ElasticSpace(mlp=args.mlp, heads=args.heads)
        rank, world, _ = init_distributed(cfg.device, group=cfg.parallel != "none")
        if args.tokens_cache is not None:  # prepared: every rank reads it as it is
            data = open_cache(args.tokens_cache)
        elif rank == 0:  # one rank tokenises; the others read the cache it wrote
            data = tokenize_files(args.data, tokenizer, args.cache, val_fraction=args.val_fraction,
                                  progress=not args.no_progress)
        if rank == 0 and args.mix_data is not None:
            tokenize_files(args.mix_data, tokenizer, mix_cache, val_fraction=args.val_fraction,
                           progress=not args.no_progress)
    if args.tokens_cache is not None:
        check_cache_tokenizer(data, tokenizer, tok_dir)
    if dist.is_initialized():
        dist.barrier()
    if rank != 0 and args.tokens_cache is None:
        data = tokenize_files(args.data, tokenizer, args.cache, val_fraction=args.val_fraction, progress=False)
    if args.mix_data is not None:  # rank 0 tokenised it before the barrier; the others find its cache
        with user_input():
            other = tokenize_files(args.mix_data, tokenizer, mix_cache, val_fraction=args.val_fraction,
                                   progress=rank == 0 and not args.no_progress)
            data = mix(data, other, args.mix_share)
    with user_input():
        fm = load_model(args.model, space=space, data=data, rank_windows=args.rank_windows, seq_len=cfg.seq_len)
    check_vocab(tokenizer, fm.model.get_input_embeddings().num_embeddings, tokenizer_source=tok_dir,
                model_source=args.model)
    if getattr(fm, "tokenizer", None) is None:
        fm.tokenizer = tokenizer  # saved with OUT/model, so later commands find it there
    with user_input():
        trainer = Trainer(fm, data, cfg, args.out, resume=args.resume)
    if rank == 0:
        print(f"{data}; {world} process(es); global batch {cfg.batch_size * cfg.grad_accum * world} x {cfg.seq_len}")
    trainer.fit()
    if rank == 0:
        evals = [r for r in trainer.history if "eval" in r]
        if evals:
            print(f"step {evals[-1]['step']}: validation perplexity {evals[-1]['eval']}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
