"""The ``flextron`` command: ``demo``, ``train``, ``profile``, ``route`` and ``generate``, one module each; ``args``
holds what they share (argument types, one-line input errors, the tokenizer rule)."""

from __future__ import annotations

import argparse

from .args import ArgumentParser, UsageError, report
from .demo import add_demo_parser
from .generate import add_generate_parser
from .profile import add_profile_parser
from .route import add_route_parser
from .sample import add_sample_parser
from .train import add_train_parser

EPILOG = """\
Tokenizer: train and route tokenise text with --tokenizer DIR when given, else with the tokenizer saved in the
model's own folder; without either they stop (there is no default tokenizer), and a tokenizer with more tokens
than the model's input embedding is refused.

Errors: bad input (a missing path, a Hugging Face folder where a flextron checkpoint is needed, a value out of
range, a malformed llama-random spec) is reported in one line on stderr, 'flextron COMMAND: error: ...', with exit
status 2; --debug shows the traceback instead. Any other failure is a bug and always shows its traceback.
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``flextron`` parser with every subcommand."""
    parser = ArgumentParser(prog="flextron", description="Elastic sub-networks (Flextron) of Hugging Face causal "
                            "LMs: rank, train, profile, route and run them.", epilog=EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an input error instead of its one-line message")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_demo_parser(sub)
    add_train_parser(sub)
    add_profile_parser(sub)
    add_route_parser(sub)
    add_sample_parser(sub)
    add_generate_parser(sub)
    for sp in sub.choices.values():  # --debug is also accepted after the command
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an input error instead of its one-line message")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``flextron``; returns the exit status. Input errors (:class:`flextron.cli.args.UsageError`) print one line
    ``flextron COMMAND: error: ...`` on stderr and return 2 (``--debug``: raised with their traceback); argparse's
    own errors exit with status 2 the same way."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        if args.debug:
            raise
        return report(args.command, e)
