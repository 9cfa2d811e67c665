"""``flextron generate``: text from a model at one budget, or at one budget per prompt in one batch."""

from __future__ import annotations

import time

import torch

from ..model import FlextronModel
from . import args as c
from .args import UsageError, check_vocab, load_tokenizer, user_input


def add_generate_parser(subparsers):
    """``flextron generate``: continue prompts with a model at its budgets."""
    p = subparsers.add_parser(
        "generate", help="continue prompts with a model, at one latency budget or one per prompt",
        description="Continue prompts with a flextron checkpoint or a Hugging Face model folder. Every prompt runs "
                    "at its own budget in one batch (per-request budgets): a latency fraction goes through the "
                    "checkpoint's static router when it has one, else it keeps that fraction of every layer's "
                    "neurons and heads. One prompt streams its tokens as they come.")
    p.add_argument("model", type=c.model_dir, help="a flextron checkpoint or a Hugging Face model folder")
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt; repeat the option for several (a batch)")
    p.add_argument("--prompts-file", default=None, type=c.existing_file,
                   help="a text file with one prompt per line (empty lines skipped), after any --prompt")
    p.add_argument("--budget", default=(1.0,), type=c.fractions,
                   help="latency fractions in (0, 1]: one for every prompt, or one per prompt, comma-separated "
                        "(default 1.0: the full model)")
    p.add_argument("--max-new-tokens", type=c.positive_int, default=64,
                   help="tokens to generate per prompt; int >= 1 (default %(default)s)")
    p.add_argument("--temperature", type=c.nonnegative_float, default=0.0,
                   help="sampling temperature; 0 is greedy; >= 0 (default %(default)s)")
    p.add_argument("--seed", type=c.nonnegative_int, default=0, help="seed of the sampler; int >= 0 (default 0)")
    p.add_argument("--tokenizer", default=None, type=c.tokenizer_dir,
                   help="tokenizer folder (default: the one saved with the model; there is no other default)")
    p.add_argument("--device", default=None, type=c.device,
                   help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--compile", action="store_true",
                   help="generate with transformers' static cache and a compiled decode step (torch.compile)")
    p.set_defaults(func=run_generate)
    return p


def _prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        with user_input(f"cannot read {args.prompts_file!r}"):
            with open(args.prompts_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise UsageError("give at least one prompt (--prompt TEXT or --prompts-file FILE)")
    return prompts


def load_model(path: str) -> FlextronModel:
    """A flextron checkpoint as it was saved, or a Hugging Face model folder converted (in eval mode)."""
    from pathlib import Path

    if (Path(path) / "flextron.json").is_file():
        return FlextronModel.from_pretrained(path)
    from transformers import AutoModelForCausalLM

    return FlextronModel.from_hf(AutoModelForCausalLM.from_pretrained(path))


def run_generate(args) -> int:
    """``flextron generate``. Bad input raises :class:`flextron.cli.args.UsageError` before any generation."""
    prompts = _prompts(args)
    budgets = list(args.budget)
    if len(budgets) == 1:
        budgets *= len(prompts)
    if len(budgets) != len(prompts):
        raise UsageError(f"--budget gives {len(budgets)} fractions for {len(prompts)} prompts: give one, or one per "
                         f"prompt")
    if args.device:
        c.check_device_available(args.device)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tok, tok_dir = load_tokenizer(args.model, args.tokenizer)
    with user_input():
        fm = load_model(args.model)
    check_vocab(tok, fm.model.get_input_embeddings().num_embeddings, tokenizer_source=tok_dir,
                model_source=args.model)
    with user_input():
        subnets = fm.resolve_budgets(budgets)
    fm.to(device).eval()
    tok.padding_side = "left"  # new tokens follow every prompt directly
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    enc = tok(prompts, return_tensors="pt", padding=True).to(device)
    kw = dict(max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id, budgets=subnets,
              attention_mask=enc["attention_mask"])
    if args.temperature > 0:
        kw.update(do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0)
    else:
        kw.update(do_sample=False)
    if args.compile:
        from transformers.generation import CompileConfig

        compile_config = CompileConfig()
        compile_config._compile_all_devices = True  # transformers compiles only on accelerators otherwise
        kw.update(cache_implementation="static", compile_config=compile_config)
    if len(prompts) == 1:
        from transformers import TextStreamer

        kw["streamer"] = TextStreamer(tok, skip_prompt=False, skip_special_tokens=True)
        print(f"[{subnets[0]!r}]", flush=True)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = fm.generate(enc["input_ids"], **kw)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    new = out[:, enc["input_ids"].shape[1]:]
    n_new = int((new != tok.pad_token_id).sum()) if tok.pad_token_id is not None else new.numel()
    if len(prompts) > 1:
        for i, (p, s) in enumerate(zip(prompts, subnets)):
            print(f"[{i}] {s!r}")
            print(p + tok.decode(new[i], skip_special_tokens=True))
    print(f"{n_new} new tokens in {seconds:.2f} s: {n_new / seconds:.1f} tokens/s on {device}"
          f"{' (compiled, static cache)' if args.compile else ''}")
    return 0
