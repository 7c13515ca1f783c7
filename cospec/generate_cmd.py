"""``cospec generate``: decode one prompt with one method and stream the text."""

from __future__ import annotations

import json
import sys

from cospec.args import (
    add_decoding_args,
    add_draft_weights_arg,
    add_model_args,
    load_pair_of,
    note_unread_options,
    options_of,
    sampling_of,
)
from cospec.errors import CospecError
from cospec.methods import (
    DEFAULT_METHOD,
    OWN_METHODS,
    build_method,
    check_sampling,
    encode_prompt,
    eos_ids,
    needs_draft,
)
from cospec.models import check_context, reads_int8
from cospec.stats import DecodeStats
from cospec.text_stream import pieces, warn_outside_vocab


def cmd_generate(args) -> int:
    if args.method not in OWN_METHODS:
        raise CospecError(f"unknown method {args.method!r} for generate; choose from "
                          f"{', '.join(OWN_METHODS)}")
    if not args.prompt.strip():
        raise CospecError("empty prompt")
    options, sampling = options_of(args), sampling_of(args)
    check_sampling(args.method, sampling)
    note_unread_options(options, [args.method])
    pair = load_pair_of(args, need_draft=needs_draft([args.method]), methods=[args.method])
    method = build_method(args.method, pair, options, sampling)
    tok = pair.tokenizer
    ids = encode_prompt(tok, args.prompt, chat=not args.no_chat)
    check_context(pair, len(ids), args.max_new_tokens)
    stats = DecodeStats()
    out: list[int] = []
    stream = method.stream(ids, k=args.k, max_new_tokens=args.max_new_tokens,
                           sampling=sampling, eos_ids=eos_ids(tok, pair.target),
                           seed=args.seed, stats=stats)
    if args.json:
        out = [token.id for token in stream]
        warn_outside_vocab(out, tok)  # (pieces does for the text below)
    else:  # the text as it comes, a character split between tokens shown once whole
        color = args.color and sys.stdout.isatty()
        for token, piece in pieces(stream, tok):
            out.append(token.id)
            print(f"\033[32m{piece}\033[0m" if color and token.from_draft else piece, end="",
                  flush=True)
    text = tok.decode(out, skip_special_tokens=True)
    weights = "int8" if reads_int8(pair.draft) else "model"  # what the draft's steps read
    if args.json:
        print(json.dumps({"method": args.method, "k": args.k, "text": text, "token_ids": out,
                          "draft_weights": weights, "stats": stats.to_dict()}))
    else:
        s = stats
        print(f"\n\n[{args.method}] {s.generated} tokens, {s.tokens_per_s:.2f} tok/s, "
              f"tau {s.tau:.2f}, prefill {s.prefill_s:.2f}s, decode {s.decode_s:.2f}s"
              + (", int8 draft" if weights == "int8" else "")
              + (f", overrides {s.overrides}/{s.arbiter_calls}" if s.arbiter_calls else ""),
              file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="decode one prompt and stream the text")
    add_model_args(p)
    add_draft_weights_arg(p, auto=True)
    add_decoding_args(p)
    p.add_argument("--method", default=DEFAULT_METHOD,
                   help=f"default {DEFAULT_METHOD}; one of {', '.join(OWN_METHODS)}")
    p.add_argument("--prompt", required=True)
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.add_argument("--color", action="store_true", help="color draft-kept tokens")
    p.set_defaults(func=cmd_generate)
