"""``flextron sample-corpus``: the parent model writes its own training text (:mod:`flextron.synth`)."""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

from .. import synth
from . import args as c
from .args import UsageError, check_device_available, check_vocab, config_vocab_size, load_tokenizer, user_input

STOPPED = 3  # exit status when --time-limit stopped the run before --tokens: run the same command again


def _prompts_arg(s: str) -> str:
    return s if s == "bos" else c.existing_file(s)


DTYPES = ("float32", "bfloat16", "float16")


def _device_arg(s: str) -> str:
    return s if s == "auto" else c.device(s)


def add_sample_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``sample-corpus`` to a ``flextron`` command's subparsers."""
    p = subparsers.add_parser(
        "sample-corpus", help="sample a training corpus from the parent model (resumable), with real validation text",
        description="Sample documents from --model until at least --tokens training tokens are written to --out as a "
        "token cache (train.bin, val.bin, tokens.json) that `flextron train --tokens-cache` reads; val.bin is the "
        "held-out split (last 10% of documents) of --val-text. The same command continues an unfinished --out. "
        f"Exit status 0: the corpus is complete; {STOPPED}: --time-limit stopped it first (run it again); 2: bad "
        "input.")
    p.add_argument("--model", required=True, type=c.model_dir,
                   help="a Hugging Face model folder or a flextron checkpoint (its active sub-network samples)")
    p.add_argument("--out", required=True, help="corpus folder: new, empty, or one this command wrote (continued)")
    p.add_argument("--tokens", required=True, type=c.positive_int,
                   help="stop once at least this many training tokens are written; int >= 1")
    p.add_argument("--val-text", required=True, nargs="+", type=c.existing_file,
                   help="real text files (documents separated by <|endoftext|>) whose last 10%% of documents is the "
                        "validation split")
    p.add_argument("--tokenizer", default=None, type=c.tokenizer_dir,
                   help="tokenizer folder (default: the tokenizer saved in --model; there is no other default)")
    p.add_argument("--prompts", nargs="+", type=_prompts_arg, default=["bos"],
                   help="'bos' (documents start from <s>) or text files whose documents' first --prompt-tokens "
                        "tokens start the documents, cycling (default bos)")
    p.add_argument("--prompt-tokens", type=c.positive_int, default=8,
                   help="tokens of each prompt document used as the prompt; int >= 1 (default %(default)s)")
    p.add_argument("--seq-len", type=c.int_at_least(2), default=512,
                   help="most tokens of a document, <s> included; int >= 2 (default %(default)s)")
    p.add_argument("--batch-size", type=c.positive_int, default=64,
                   help="documents sampled per generate call; int >= 1 (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed; int (default %(default)s)")
    p.add_argument("--temperature", type=c.positive_float, default=1.0,
                   help="sampling temperature (top_k 0, top_p 1); > 0 (default %(default)s)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="the parent's weights while sampling: float32 (as saved, exact) or bfloat16/float16 (about "
                        "half the memory traffic on a GPU; the corpus records the dtype and the checksum of the "
                        "weights that sampled) (default %(default)s)")
    p.add_argument("--cache", choices=synth.CACHES, default="dynamic",
                   help="the KV cache of generate: dynamic (transformers' default) or static (fixed size; on a GPU "
                        "transformers then compiles the decode step and replays it from CUDA graphs, after a "
                        "one-time compile); a corpus continues with the cache it started with (default "
                        "%(default)s)")
    p.add_argument("--device", type=_device_arg, default="auto",
                   help="auto (the GPU when there is one, else the CPU), cpu, cuda or cuda:N (default %(default)s)")
    p.add_argument("--time-limit", type=c.nonnegative_float, default=None,
                   help=f"stop after the batch in flight once this many seconds have passed (exit status {STOPPED}; "
                        "run the same command again to continue); >= 0 (default: no limit)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run_sample)
    return p


def _load_model(path: str, device: str, dtype: str = "float32"):
    import torch

    dt = getattr(torch, dtype)
    if (Path(path) / c.FLEXTRON_META).is_file():
        from ..model import FlextronModel

        fm = FlextronModel.from_pretrained(path)
        fm.model.to(device=device, dtype=dt)
        return fm, fm.model.get_input_embeddings().num_embeddings
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=dt).to(device).eval()
    return m, m.get_input_embeddings().num_embeddings


def run_sample(args: argparse.Namespace) -> int:
    """``flextron sample-corpus``. Bad input raises :class:`flextron.cli.args.UsageError` before any sampling."""
    import torch
    from transformers.utils import logging as hf_logging

    import flextron_kernels

    hf_logging.disable_progress_bar()  # one progress bar: ours
    prompts = args.prompts
    if "bos" in prompts:
        if len(prompts) > 1:
            raise UsageError("--prompts takes 'bos' alone or text files, not both")
        prompts = "bos"
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    check_device_available(device)
    tokenizer, tok_dir = load_tokenizer(args.model, args.tokenizer)
    vocab = config_vocab_size(args.model)
    if vocab is not None:
        check_vocab(tokenizer, vocab, tokenizer_source=tok_dir, model_source=args.model)
    with user_input(f"cannot load the model in {args.model!r}"):
        model, n_embed = _load_model(args.model, device, args.dtype)
    check_vocab(tokenizer, n_embed, tokenizer_source=tok_dir, model_source=args.model)
    with user_input():
        job = synth.prepare_corpus(model, tokenizer, args.out, tokens=args.tokens, val_text_files=args.val_text,
                                   seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed,
                                   temperature=args.temperature, prompts=prompts, prompt_tokens=args.prompt_tokens,
                                   progress=not args.no_progress, time_limit_s=args.time_limit,
                                   cache=args.cache)
    before = synth.progress_state(args.out) or {}
    if before:
        print(f"continuing {args.out}: {before.get('train_tokens', 0):,} of {args.tokens:,} tokens "
              f"({before.get('batches_done', 0)} batches) already written")
    # On the CPU a flextron checkpoint runs the plain-torch reference ops, never the Triton interpreter.
    ctx = flextron_kernels.cpu_reference() if torch.device(device).type == "cpu" else contextlib.nullcontext()
    t0 = time.perf_counter()
    try:
        with ctx:
            data = job.run()
    except synth.SamplingStalled as e:
        raise UsageError(str(e)) from e
    wall = time.perf_counter() - t0
    after = synth.progress_state(args.out) or {}
    new = after.get("train_tokens", 0) - before.get("train_tokens", 0)
    rate = f"{new / wall:,.0f} tokens/s" if wall > 0 and new > 0 else "no new tokens"
    print(f"sampled {new:,} tokens in {wall:.1f} s ({rate}) on {device}")
    if data is None:
        print(f"stopped by --time-limit at {after.get('train_tokens', 0):,} of {args.tokens:,} tokens; run the same "
              f"command again to continue")
        return STOPPED
    m = data.meta
    g = m["generated"]
    print(f"{data.path}: train {m['tokens']['train']:,} tokens in {m['documents']['train']:,} documents "
          f"({g['documents']:,} generated, {g['duplicates_dropped']:,} duplicates and {g['empty_dropped']:,} empty "
          f"dropped, {g['batches']} batches); val {m['tokens']['val']:,} tokens of real text "
          f"({m['documents']['val']} documents); parent sha256 {m['parent']['sha256'][:16]}...")
    return 0
