"""Command-line arguments shared by the subcommands, and what they build: sampling settings,
method options and the loaded models (with ``--k auto`` resolved)."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable

from cospec.batch_scheduler import SPEC_OFF_AT
from cospec.cos import MU_MAX
from cospec.errors import CospecError
from cospec.methods import TARGET_OUTPUT, MethodOptions, needs_draft, unread_options
from cospec.models import (
    DEFAULT_DRAFT,
    DEFAULT_TARGET,
    DRAFT_WEIGHTS,
    Pair,
    check_device,
    default_device,
    default_dtype,
    draft_weights,
)
from cospec.sampling import SamplingConfig
from cospec.sandbox import MODES


def _number(kind: type, ok, rule: str):
    """An argparse type: ``kind(text)`` where ``ok(value)``, else a message saying ``rule``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if not (ok(value) and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    return parse


# argparse types of the subcommands' numeric flags (a float one refuses inf and nan too)
positive_int = _number(int, lambda v: v > 0, "> 0")
nonneg_int = _number(int, lambda v: v >= 0, ">= 0")
positive_float = _number(float, lambda v: v > 0, "a finite number > 0")
nonneg_float = _number(float, lambda v: v >= 0, "a finite number >= 0")
finite_float = _number(float, lambda v: True, "a finite number")
unit = _number(float, lambda v: 0 < v <= 1, "in (0, 1]")
unit_closed = _number(float, lambda v: 0 <= v <= 1, "in [0, 1]")
contrast_mu = _number(float, lambda v: 0 <= v <= MU_MAX, f"in [0, {MU_MAX:g}]")
seed_int = _number(int, lambda v: -(2**63) <= v < 2**63, "in [-2^63, 2^63)")
FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max


def in_float32(parse):
    """An argparse type: the number ``parse`` reads, refused where float32, which the policy
    trains in, cannot hold it (train's and refine's ``--lr``, ``--speed-bonus``): it would
    become inf there, and the training NaN."""
    def check(text: str) -> float:
        value = parse(text)
        if abs(value) > FLOAT32_MAX:
            raise argparse.ArgumentTypeError(f"must be at most {FLOAT32_MAX:.4g} in size "
                                             f"(float32, what training computes in), got {text}")
        return value
    return check


def resolved_dtype(args) -> str:
    """``--dtype``, else the device's default (float32 on a CPU, bfloat16 on a GPU): what a
    results folder records, so that a resume in another one is refused."""
    if args.dtype:
        return args.dtype
    device = check_device(args.device or default_device())
    return str(default_dtype(device)).removeprefix("torch.")


def changed_settings(old: dict, new: dict, keys, later: dict) -> dict[str, tuple]:
    """{key: (old value, new value)} for each of ``keys`` whose value a resumed run would
    change. ``later``: keys recorded only since some version, with the value a record made
    before had (None: unknown, that key not compared where ``old`` lacks it)."""
    diff = {}
    for k in keys:
        a, b = old.get(k, later.get(k)), new.get(k, later.get(k))
        if a != b and (a is not None or k not in later):
            diff[k] = (a, b)
    return diff


def draft_length(text: str) -> int | str:
    """An argparse type for --k: a positive integer, or ``auto`` (chosen by timing the pair
    once on this machine: ``k_auto.auto_k``; resolved by ``load_pair_of``)."""
    return "auto" if text == "auto" else positive_int(text)


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--target", default=DEFAULT_TARGET,
                   help="target: shipped name, .gguf file, HF folder or hub id "
                        "(default %(default)s)")
    g.add_argument("--draft", default=DEFAULT_DRAFT, help="draft model (default %(default)s)")
    g.add_argument("--models", default=None,
                   help="CoS with n models: comma-separated, the proposer (smallest) first and "
                        "the target last (replaces --draft / --target)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="default: float32 on CPU, bfloat16 on GPU")
    g.add_argument("--tp", type=_number(int, lambda v: v >= 1, "an integer >= 1"), default=1,
                   help="tensor-parallel ranks for the target (launch with torchrun "
                        "--nproc-per-node N -m cospec ... --tp N; only rank 0 prints and writes)")


AUTO = "auto"  # --draft-weights of generate and serve: ``auto_draft_weights`` decides


def add_draft_weights_arg(p: argparse.ArgumentParser, auto: bool = False) -> None:
    """``--draft-weights``: generate, bench, eval and serve; ``auto`` (generate and serve)
    offers "auto", its default (``auto_draft_weights``); eval and bench keep "model" as
    theirs, so that a committed command measures what it measured. The batch engines
    (``fast_batch``) read the draft's own weights, and on a GPU so does eval's batched
    decoder, so there eval keeps to the methods it decodes at batch 1, and serve beside
    batch engines to those whose output is the target's (``server.int8_batch``)."""
    p.add_argument("--draft-weights", choices=(AUTO, *DRAFT_WEIGHTS) if auto else DRAFT_WEIGHTS,
                   default=AUTO if auto else "model",
                   help="int8: the draft's steps read int8 copies of its projections and "
                        "lm_head (one scale a row): on a CPU every forward after the "
                        "prompt's prefill, at batch 1 and in eval's batched decoder "
                        "(torch's int8 kernel: a 0.5B step 2.2x faster in float32), on a "
                        "GPU the fused layers at batch 1 (half the bytes). spd's output "
                        "stays the target's; cospec and CoS use the int8 draft's tokens and "
                        "distribution. " + (
                            "auto (default): int8 where every method's output is the "
                            "target's (target, spd, lookup, spd-lookup, spd-staged) and a "
                            "fast kernel reads the copies (a CPU with torch's int8 kernel, "
                            "a GPU's fused layers; serve: read by some request's "
                            "batch-1 path), else model" if auto else
                            "Default: model, the draft's own weights"))


def auto_draft_weights(pair, methods: list[str], readers: list[str] | None = None) -> str:
    """What ``--draft-weights auto`` reads: "int8" where the draft's int8 copies change no
    output of ``methods`` (all in ``TARGET_OUTPUT``: greedy the target's tokens, sampled
    its distribution; a seed's sample may differ), some method of ``readers`` (default:
    ``methods``; serve: those its batch engines leave to the batch-1 paths) runs the draft,
    and a fast kernel reads the copies (on a CPU, torch's int8 kernel:
    ``cpu_int8.can_copy``; on a GPU, the fused layers: ``fast.fused_runs``); else "model".
    Not for a CoS combination of more models."""
    from cospec import cpu_int8, fast

    if pair.draft is None or pair.extra or any(m not in TARGET_OUTPUT for m in methods):
        return "model"
    if not needs_draft(methods if readers is None else readers):
        return "model"
    if next(pair.draft.parameters()).device.type == "cpu":
        return "int8" if cpu_int8.can_copy(pair.draft) else "model"
    return "int8" if fast.fused_runs(pair.draft) else "model"


def add_decoding_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--k", type=draft_length, default=4,
                   help="draft length (default 4), or auto: the fastest on this CPU, "
                        "from the pair's timed forwards")
    g.add_argument("--max-new-tokens", type=positive_int, default=128)
    g.add_argument("--temperature", type=nonneg_float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=unit, default=1.0)
    g.add_argument("--top-k", type=nonneg_int, default=0, help="0 = no top-k filter")
    g.add_argument("--seed", type=seed_int, default=0)
    g.add_argument("--no-chat", action="store_true", help="send the prompt as raw text")
    g.add_argument("--arbiter", default=None, help="arbiter file for --method cospec")
    g.add_argument("--threshold", type=unit_closed, default=None,
                   help="P(DRAFT) needed to keep a draft token (cospec; default: the arbiter's)")
    g.add_argument("--first-mismatch-only", action="store_true",
                   help="arbitrate only the first mismatch of each block")
    g.add_argument("--max-overrides", type=nonneg_int, default=None,
                   help="draft tokens an arbiter may keep per generation (default: the "
                        "arbiter's own, else no limit)")
    g.add_argument("--delta", type=nonneg_float, default=0.1,
                   help="confidence heuristic threshold")
    g.add_argument("--entropy", type=nonneg_float, default=1.0,
                   help="entropy-gated deferral (nats)")
    g.add_argument("--lambda", dest="lam", type=unit_closed, default=0.5,
                   help="CoS ensemble: r = lambda q_draft + (1 - lambda) p_target")
    g.add_argument("--weights", default=None,
                   help="CoS ensemble weights, one per model of --models, summing to 1 "
                        "(default: --lambda for two models, else uniform)")
    g.add_argument("--mu", type=contrast_mu, default=0.1,
                   help=f"CoS contrastive: r = softmax(l_target - mu l_draft), 0 <= mu <= "
                        f"{MU_MAX:g}")
    g.add_argument("--sandbox", choices=MODES, default="auto",
                   help="where generated code is graded: bwrap (required), process (a plain "
                        "subprocess) or auto (bwrap where it runs; default)")


LIST_FLAGS = ("--weights",)  # flags whose value is a comma-separated list of numbers


def join_list_values(argv: list[str]) -> list[str]:
    """``argv`` with each ``FLAG VALUE`` of ``LIST_FLAGS`` whose value starts with ``-`` joined
    into ``FLAG=VALUE``: argparse takes a value like ``-1,2`` for another flag ("expected one
    argument"), so it would never reach the flag's own check (``options_of``)."""
    out: list[str] = []
    for arg in argv:
        signed = arg[:1] == "-" and (arg[1:2].isdigit() or arg[1:2] == ".")
        if out and out[-1] in LIST_FLAGS and signed:
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def sampling_of(args) -> SamplingConfig:
    return SamplingConfig(args.temperature, args.top_p, args.top_k)


def options_of(args) -> MethodOptions:
    weights: tuple[float, ...] = ()
    if args.weights:
        try:
            weights = tuple(float(w) for w in args.weights.split(","))
        except ValueError:
            weights = (math.nan,)
        if not all(math.isfinite(w) for w in weights):
            raise CospecError(f"--weights must be finite numbers separated by commas: "
                              f"{args.weights!r}")
    if args.arbiter:
        from cospec.arbiter import arbiter_info

        arbiter_info(args.arbiter)  # a bad file is refused before any model is loaded
    return MethodOptions(args.arbiter, args.threshold, not args.first_mismatch_only,
                         args.max_overrides, args.delta, args.entropy, args.lam, args.mu,
                         weights=weights)


def note_unread_options(options: MethodOptions, methods: list[str]) -> None:
    """A note on stderr for each decoding flag given that none of ``methods`` reads
    (``methods.unread_options``): it is ignored, not an error, as a flag of the same command
    is for another method."""
    for _, flag, readers in unread_options(options, methods):
        print(f"note: {flag} is read by {', '.join(readers)} only; "
              f"{', '.join(methods)} ignore{'s' if len(methods) == 1 else ''} it",
              file=sys.stderr)


def load_pair_of(args, need_draft: bool = True,
                 methods: list[str] | Callable[[Pair], tuple[list[str], list[str]]] | None = None
                 ) -> Pair:
    """The models named by ``args``; resolves ``args.k == "auto"`` for them (``auto_k``) and
    gives the draft int8 weights where ``--draft-weights int8`` asks (``draft_weights``).
    ``--draft-weights auto`` is resolved by ``auto_draft_weights`` for ``methods``: the
    names, or a function of the loaded pair giving them and their readers, and written
    back to ``args.draft_weights``."""
    pair = _load_pair(args, need_draft)
    if getattr(args, "draft_weights", "model") == AUTO:
        names, readers = methods(pair) if callable(methods) else (methods or [], None)
        args.draft_weights = auto_draft_weights(pair, list(names), readers)
    draft_weights(pair, getattr(args, "draft_weights", "model"))
    if getattr(args, "k", None) == "auto":
        from cospec.k_auto import auto_k

        args.k = auto_k(pair) if pair.draft is not None else 1  # target-only: k is unused
    if isinstance(getattr(args, "k", None), int):
        warn_eager_verify(pair.target, args.k)
    return pair


def warn_eager_verify(target, k: int) -> None:
    """Warn when a verify of k + 1 rows is past the fast path's CUDA graphs and fused layers
    (``fast.MAX_GRAPH`` rows): each would run eagerly, several times slower (prompt lookup
    at k = 16 ran at 0.4-0.6x target-only on an H100)."""
    import warnings

    from cospec import fast

    if k + 1 > fast.MAX_GRAPH and fast.wanted(target):
        warnings.warn(f"--k {k}: a verify of {k + 1} rows is past the fast path's "
                      f"{fast.MAX_GRAPH}-row CUDA graphs and fused layers and runs eagerly, "
                      f"several times slower; k <= {fast.MAX_GRAPH - 1} keeps it fast",
                      stacklevel=2)


def _load_pair(args, need_draft: bool):
    import torch

    from cospec.models import load_pair, set_cpu_threads

    set_cpu_threads()
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if getattr(args, "tp", 1) > 1:
        from cospec import tp

        if args.models or getattr(args, "k", None) == "auto":
            raise CospecError("--tp shards one target: --models and --k auto need it whole")
        device = tp.init(args.tp, args.device)
        return tp.load_pair(args.target, args.draft if need_draft else None, device, dtype)
    if args.models:
        specs = [m.strip() for m in args.models.split(",") if m.strip()]
        if len(specs) < 2:
            raise CospecError(f"--models needs at least two models, got {args.models!r}")
        pair = load_pair(specs[-1], specs[0], args.device, dtype, tuple(specs[1:-1]))
    else:
        pair = load_pair(args.target, args.draft if need_draft else None, args.device, dtype)
    return pair


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``cospec serve`` (here, not in ``cospec.server``, so that the command line
    reads the same, and says what to install, where the serve extra is missing)."""
    add_model_args(p)
    add_draft_weights_arg(p, auto=True)
    p.add_argument("--arbiter", default=None, help="arbiter file for the cospec method")
    p.add_argument("--methods", default=None,
                   help="methods to offer, comma-separated (default: target, spd, and cospec "
                        "when an arbiter for the pair is available)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send (default: the --target spec)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: any free port")
    p.add_argument("--k", type=draft_length, default=4,
                   help="draft length when a request sets none (or auto: see cospec generate)")
    p.add_argument("--max-active", type=int, default=4,
                   help="requests of methods no batch engine runs (we, cd, lookup, spd-lookup, "
                        "spd-staged) decoded at once, "
                        "round robin token by token")
    p.add_argument("--max-batch", type=int, default=16,
                   help="requests decoded together by the batch engines (target, spd, "
                        "cospec, cos-*, *-sd); 0: none, every request round robin")
    p.add_argument("--spec-off-at", type=int, default=SPEC_OFF_AT,
                   help="while this many requests would decode at once (or did within the "
                        "last second), spd and lookup requests run "
                        "target-only, those already decoding too (same output: the target's "
                        "greedy tokens or a sample of its distribution; seeded sampled "
                        "requests keep their method); their engine then has this many - 1 "
                        "rows beside --max-batch; 0: never (default: 4, where batched lookup "
                        "measured slower than target-only on a GPU and on a CPU, and spd on "
                        "a CPU; on a GPU spd lost from 8 rows)")
    p.add_argument("--no-solo", dest="solo", action="store_false",
                   help="a lone greedy spd, cospec or cos-we request (or an unseeded "
                        "sampled spd or cos-we one) takes the batch engines too (default: it "
                        "decodes on the batch-1 path, each block on the device, until another "
                        "request arrives, spd as spd-staged; on a GPU)")
    p.add_argument("--max-context", type=int, default=2048,
                   help="tokens per request, prompt + completion (at most the model's): "
                        "with --max-batch, the KV cache budget")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting beyond those; more get 429")
    p.add_argument("--timeout", type=positive_float, default=300.0,
                   help="seconds per request, queueing included (then finish_reason length)")
    p.add_argument("--default-max-tokens", type=int, default=256,
                   help="max_tokens of a request that sets none")
    p.add_argument("--warm-up", action="store_true",
                   help="before serving, capture the CUDA graphs of the default method's batch "
                        "engine (at --k) for every batch size and context length (its prefill "
                        "graphs too; compiled with COSPEC_PREFILL=compiled), so "
                        "that no request waits for them (GPU; costs start-up time; CPU: no-op)")
