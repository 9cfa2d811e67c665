"""What the ``flextron`` subcommands share: argument types, user-error reporting and the tokenizer rule.

Argument types raise :class:`argparse.ArgumentTypeError`, so argparse answers bad input with exit status 2.
Errors the command's own checks find later (a checkpoint without a tokenizer, a tokenizer too large for the model,
a latency table of another model, ...) are :class:`UsageError`; ``flextron``'s ``main`` prints them as one line,
``flextron <command>: error: <message>``, and returns 2. Any other exception is a bug and keeps its traceback.

Tokenizer rule: a command that tokenises text uses ``--tokenizer DIR`` when given, else the tokenizer stored in the
model's own folder (``tokenizer.json`` or ``tokenizer_config.json``, as ``save_pretrained(path, tokenizer=...)``
writes them). There is no fallback: without either the command refuses, and a tokenizer whose vocabulary is larger
than the model's input embedding is refused too.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

FLEXTRON_META = "flextron.json"  # the file that makes a folder a flextron checkpoint
FLEXTRON_SAVING = ".flextron-saving.json"  # left by a save into a checkpoint that was interrupted
HF_CONFIG = "config.json"  # the file that makes a folder a Hugging Face model
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
LLAMA_RANDOM = "llama-random:"
CONVERT_HINT = ("make one with `flextron train --model HF_DIR ...` (writes OUT/model) or in Python with "
                "FlextronModel.from_hf(model, tokenizer=tokenizer).save_pretrained(OUT)")


class UsageError(ValueError):
    """Bad input to the ``flextron`` command: reported as one line on stderr, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` whose errors are one line on stderr, ``PROG: error: MESSAGE``, exit status 2
    (the usage is in ``--help``). Subparsers made by ``add_subparsers`` are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


def one_line(message: object) -> str:
    """``message`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(message).split())


def report(command: str, error: BaseException, file=None) -> int:
    """Print ``error`` as ``flextron <command>: error: ...`` on one line of stderr; returns 2 (the exit status)."""
    prog = f"flextron {command}" if command else "flextron"
    print(f"{prog}: error: {one_line(error) or type(error).__name__}", file=file or sys.stderr)
    return 2


@contextlib.contextmanager
def user_input(what: str | None = None):
    """Treat ``ValueError``/``TypeError``/``OSError`` raised inside as bad input: re-raised as :class:`UsageError`
    (prefixed with ``what`` when given), the original chained. Wrap only code that checks or loads the user's
    inputs, never the heavy work after it: a genuine bug there must keep its traceback."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, TypeError, OSError) as e:
        msg = one_line(e) or type(e).__name__
        raise UsageError(f"{what}: {msg}" if what else msg) from e


# -- argument types --------------------------------------------------------------------------------------------
def _number(s: str, kind, name: str):
    try:
        return kind(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not {name}") from None


def positive_int(s: str) -> int:
    """An int >= 1."""
    v = _number(s, int, "an integer")
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} is not a positive integer (>= 1)")
    return v


def nonnegative_int(s: str) -> int:
    """An int >= 0."""
    v = _number(s, int, "an integer")
    if v < 0:
        raise argparse.ArgumentTypeError(f"{v} is not an integer >= 0")
    return v


def int_at_least(low: int):
    """An int type with a lower bound (``low`` included)."""
    def parse(s: str) -> int:
        v = _number(s, int, "an integer")
        if v < low:
            raise argparse.ArgumentTypeError(f"{v} is not an integer >= {low}")
        return v
    parse.__name__ = f"int_at_least_{low}"
    return parse


def positive_float(s: str) -> float:
    """A finite float > 0."""
    v = _number(s, float, "a number")
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"{v} is not a number > 0")
    return v


def nonnegative_float(s: str) -> float:
    """A finite float >= 0."""
    v = _number(s, float, "a number")
    if not 0 <= v < float("inf"):
        raise argparse.ArgumentTypeError(f"{v} is not a number >= 0")
    return v


def unit_interval(s: str) -> float:
    """A float in [0, 1]."""
    v = _number(s, float, "a number")
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"{v} is not in [0, 1]")
    return v


def holdout_fraction(s: str) -> float:
    """A float in [0, 1)."""
    v = _number(s, float, "a number")
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"{v} is not in [0, 1)")
    return v


def fraction(s: str) -> float:
    """A width fraction: a float in (0, 1]."""
    v = _number(s, float, "a number")
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"{v} is not a fraction in (0, 1]")
    return v


def fractions(s: str) -> tuple:
    """Comma-separated width fractions, each in (0, 1], at least one: ``"0.25,0.5,1"`` -> ``(0.25, 0.5, 1.0)``."""
    parts = [p.strip() for p in s.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"{s!r} holds no fraction: give comma-separated values in (0, 1]")
    return tuple(fraction(p) for p in parts)


def betas(s: str) -> tuple:
    """Two comma-separated AdamW betas, each in [0, 1)."""
    parts = [p.strip() for p in s.split(",") if p.strip()]
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"{s!r} is not two comma-separated numbers (e.g. 0.9,0.99)")
    vals = tuple(_number(p, float, "a number") for p in parts)
    for v in vals:
        if not 0.0 <= v < 1.0:
            raise argparse.ArgumentTypeError(f"{v} is not in [0, 1)")
    return vals


def _existing(s: str, kind: str) -> Path:
    """``s`` as a path that exists and is a ``kind`` ("file" or "directory")."""
    p = Path(s)
    if not p.exists():
        raise argparse.ArgumentTypeError(f"{s!r} does not exist")
    if not (p.is_file() if kind == "file" else p.is_dir()):
        raise argparse.ArgumentTypeError(f"{s!r} is not a {kind}")
    return p


def existing_file(s: str) -> str:
    """A path to an existing file (returned as given)."""
    _existing(s, "file")
    return s


def output_file(s: str) -> str:
    """A file path to write (its folder is created); an existing directory is refused."""
    if Path(s).is_dir():
        raise argparse.ArgumentTypeError(f"{s!r} is a directory: give a file path")
    return s


def _existing_dir(s: str) -> Path:
    return _existing(s, "directory")


def flextron_checkpoint(s: str) -> str:
    """A flextron checkpoint folder (with ``flextron.json``); a plain Hugging Face folder is refused with the way
    to convert it."""
    p = _existing_dir(s)
    if (p / FLEXTRON_META).is_file():
        return s
    if (p / FLEXTRON_SAVING).is_file():
        raise argparse.ArgumentTypeError(f"{s!r} holds an incomplete flextron checkpoint (a save into it was "
                                         f"interrupted): save the model there again")
    if (p / HF_CONFIG).is_file():
        raise argparse.ArgumentTypeError(
            f"{s!r} is a Hugging Face model folder, not a flextron checkpoint (no {FLEXTRON_META}): {CONVERT_HINT}")
    raise argparse.ArgumentTypeError(f"{s!r} is not a flextron checkpoint (no {FLEXTRON_META}): {CONVERT_HINT}")


def checkpoint_destination(s: str) -> str:
    """Where a command writes a flextron checkpoint: a new path, an empty directory, or a flextron checkpoint (whose
    own files are replaced); anything else is refused before any work, since the save would refuse it after."""
    p = Path(s)
    if not p.exists():
        return s
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"{s!r} is an existing file: give a new path, an empty directory or a "
                                         f"flextron checkpoint to replace")
    if any(p.iterdir()) and not ((p / FLEXTRON_META).is_file() or (p / FLEXTRON_SAVING).is_file()):
        raise argparse.ArgumentTypeError(f"{s!r} is not empty and holds no flextron checkpoint: give a new path, an "
                                         f"empty directory or a flextron checkpoint to replace")
    return s


def model_dir(s: str) -> str:
    """A flextron checkpoint or a Hugging Face model folder (with ``config.json``)."""
    p = _existing_dir(s)
    if not ((p / FLEXTRON_META).is_file() or (p / HF_CONFIG).is_file()):
        raise argparse.ArgumentTypeError(f"{s!r} is neither a flextron checkpoint ({FLEXTRON_META}) nor a Hugging "
                                         f"Face model folder ({HF_CONFIG})")
    return s


def parse_llama_random(spec: str) -> tuple[int, int, int, int, int]:
    """``'H,I,HEADS,LAYERS[,KV_HEADS]'`` -> ``(H, I, HEADS, LAYERS, KV_HEADS)``; raises ``ArgumentTypeError`` unless
    every number is a positive int, HEADS divides H into an even head size and KV_HEADS divides HEADS."""
    form = "H,I,HEADS,LAYERS[,KV_HEADS] (positive integers, e.g. llama-random:512,1376,8,4)"
    parts = [p.strip() for p in spec.split(",")]
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"llama-random spec {spec!r} must be {form}") from None
    if len(vals) not in (4, 5) or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"llama-random spec {spec!r} must be {form}")
    h, _, heads, _ = vals[:4]
    kv = vals[4] if len(vals) == 5 else heads
    if h % heads or (h // heads) % 2:
        raise argparse.ArgumentTypeError(f"llama-random spec {spec!r}: HEADS={heads} must divide H={h} into an even "
                                         f"head size")
    if heads % kv:
        raise argparse.ArgumentTypeError(f"llama-random spec {spec!r}: KV_HEADS={kv} must divide HEADS={heads}")
    return h, vals[1], heads, vals[3], kv


def checkpoint_or_llama_random(s: str) -> str:
    """A flextron checkpoint folder, or ``llama-random:H,I,HEADS,LAYERS[,KV_HEADS]`` (returned as given)."""
    if s.startswith(LLAMA_RANDOM):
        parse_llama_random(s[len(LLAMA_RANDOM):])
        return s
    return flextron_checkpoint(s)


def device(s: str) -> str:
    """A torch device string (``cpu``, ``cuda``, ``cuda:1``)."""
    import torch

    try:
        torch.device(s)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{s!r} is not a device (e.g. cpu, cuda, cuda:1)") from None
    return s


def check_device_available(name: str) -> None:
    """Raise :class:`UsageError` when ``name`` is a CUDA device this machine lacks."""
    import torch

    d = torch.device(name)
    if d.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (n == 0) if d.index is None else (d.index >= n):
            raise UsageError(f"device {name!r} is not available: this machine has {n} CUDA device(s)")


# -- tokenizer rule --------------------------------------------------------------------------------------------
def has_tokenizer(folder: str | Path) -> bool:
    """Whether ``folder`` holds a saved tokenizer (``tokenizer.json`` or ``tokenizer_config.json``)."""
    return any((Path(folder) / f).is_file() for f in TOKENIZER_FILES)


def tokenizer_dir(s: str) -> str:
    """Type of ``--tokenizer``: a folder holding a saved tokenizer."""
    _existing_dir(s)
    if not has_tokenizer(s):
        raise argparse.ArgumentTypeError(f"{s!r} holds no tokenizer ({' or '.join(TOKENIZER_FILES)})")
    return s


def resolve_tokenizer_dir(model: str | Path, tokenizer: str | Path | None) -> Path:
    """The folder to load the tokenizer from: ``tokenizer`` (``--tokenizer``) when given, else ``model``'s own
    folder when it holds one. Raises :class:`UsageError` otherwise; there is no default tokenizer."""
    if tokenizer is not None:
        if not has_tokenizer(tokenizer):
            raise UsageError(f"--tokenizer {str(tokenizer)!r} holds no tokenizer ({' or '.join(TOKENIZER_FILES)})")
        return Path(tokenizer)
    if has_tokenizer(model):
        return Path(model)
    raise UsageError(f"{str(model)!r} holds no tokenizer: pass --tokenizer DIR (the folder of the model it was made "
                     f"from), or save the checkpoint with save_pretrained(path, tokenizer=...)")


def load_tokenizer(model: str | Path, tokenizer: str | Path | None = None):
    """The tokenizer :func:`resolve_tokenizer_dir` picks, loaded with ``AutoTokenizer``; returns
    ``(tokenizer, folder)``. A folder that fails to load raises :class:`UsageError`."""
    from transformers import AutoTokenizer

    folder = resolve_tokenizer_dir(model, tokenizer)
    with user_input(f"cannot load the tokenizer in {str(folder)!r}"):
        return AutoTokenizer.from_pretrained(folder), folder


def check_vocab(tokenizer, num_embeddings: int, *, tokenizer_source: str | Path, model_source: str | Path) -> None:
    """Raise :class:`UsageError` when ``tokenizer`` can produce ids the model has no embedding row for
    (``len(tokenizer) > num_embeddings``), naming both sizes."""
    n = len(tokenizer)
    if n > num_embeddings:
        raise UsageError(f"the tokenizer in {str(tokenizer_source)!r} has {n} tokens but the model "
                         f"{str(model_source)!r} embeds only {num_embeddings}: it belongs to another model; pass "
                         f"--tokenizer with the model's own tokenizer")


def config_vocab_size(model: str | Path) -> int | None:
    """``vocab_size`` from ``model``'s ``config.json`` (a cheap check before loading weights), or None."""
    from transformers import AutoConfig

    with user_input(f"cannot read the config of {str(model)!r}"):
        config = AutoConfig.from_pretrained(model)
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(cfg, "vocab_size", None)
