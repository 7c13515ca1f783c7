"""Command line: ``cospec generate | eval | bench | summarize | collect | train | refine |
verify-cost | serve``. Each subcommand lives in its own module (its flags and its ``cmd_*``);
the flags they share are in ``cospec.args``. This module only assembles them and dispatches."""

from __future__ import annotations

import argparse
import os
import sys

from cospec import (
    bench,
    collect,
    cpu,
    evaluate,
    fast,
    fast_batch,
    fast_block,
    fused,
    generate_cmd,
    refine,
    train,
)
from cospec.args import add_decoding_args, add_model_args, add_serve_args, join_list_values
from cospec.errors import CospecError
from cospec.sandbox import use

SERVE_EXTRA = ("fastapi", "pydantic", "starlette", "uvicorn")  # what `cospec[serve]` brings


def cmd_serve(args) -> int:
    """``cospec serve``, or a clear error when the ``serve`` extra is not installed."""
    try:
        from cospec import server
    except ModuleNotFoundError as err:
        if err.name not in SERVE_EXTRA:
            raise
        raise CospecError(f"cospec serve needs the serve extra ({err.name} is not installed): "
                          "pip install 'cospec[serve]'") from None
    return server.cmd_serve(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cospec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    generate_cmd.add_parser(sub)
    evaluate.add_parsers(sub, add_model_args, add_decoding_args)
    collect.add_parser(sub, add_model_args, add_decoding_args)
    train.add_parser(sub)
    refine.add_parser(sub, add_model_args, add_decoding_args)
    bench.add_parser(sub, add_model_args)
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/chat/completions, "
                                     "/v1/completions, streaming) with speculative metrics "
                                     "(needs the serve extra)")
    add_serve_args(p)
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(join_list_values(sys.argv[1:] if argv is None else argv))
    if getattr(args, "tp", 1) > 1 and int(os.environ.get("RANK", "0")) != 0:
        quiet_rank(args)
    try:
        check_settings()
        if getattr(args, "sandbox", None):
            use(args.sandbox)
        return args.func(args)
    except CospecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a folder that cannot be made, a file that cannot be written
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if getattr(args, "tp", 1) > 1:
            from cospec import tp

            tp.finish()


def check_settings() -> None:
    """Read every COSPEC_* setting with fixed values once (``cospec.settings``): a bad value
    is named at start, not only where a run first reads it (a CPU run never reads
    COSPEC_PREFILL)."""
    cpu.linear_mode()
    fast.prefill_mode()
    fast_block.one_graph()
    fast_block.blocks_ahead()
    fast_block.serving()
    fast_batch.run_ahead_setting()
    fused.mode()


def quiet_rank(args) -> None:
    """A tensor-parallel rank other than 0 computes with rank 0 but prints nothing and writes
    its results (``--out``) to a scratch folder that is discarded."""
    import tempfile

    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    if getattr(args, "out", None):
        args.out = tempfile.mkdtemp(prefix="cospec-rank-")


if __name__ == "__main__":
    sys.exit(main())
