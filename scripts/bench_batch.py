"""Batched decoding speed (``cospec.fast_batch``): target-only, spd, CoS at several batch sizes.

    PYTHONPATH=. python scripts/bench_batch.py --out DIR [--target qwen2.5-coder-1.5b]
        [--draft qwen2.5-coder-0.5b] [--task gsm8k,humaneval --split heldout] [--prompts 64]
        [--new 256] [--k 4] [--batches 1,4,16,64] [--temperature 0] [--ignore-eos]
        [--save-prompts FILE] [--random 1.5b|7b [--prompt-ids FILE]]
        [--methods target,spd,cos-we] [--lam 0.5] [--mu 0.1]
    PYTHONPATH=. python scripts/bench_batch.py --tiny --out DIR     # CPU smoke test

The same ``--prompts`` prompts (chat template; shared out over the comma-separated tasks,
GSM8K from ``--split``, the others from their test split) go through an engine of B slots
for every B (requests join as slots free up); all methods share the prompts and the code
path. ``--methods`` (default target,spd): any of target, spd, cos-we, cos-cd (CoS with
alternate proposal), we-sd, cd-sd (``--lam``, ``--mu`` as ``cospec.methods``); those that
need a draft are left out without one. Before the timed pass the engine's CUDA graphs are
captured for every bucket of rows <= B and every cache span (``fast_batch_warm.warm_up``), so
no capture falls inside it (on CPU there is nothing to capture). Per (B, method):
generated tokens, prefill and decode seconds, tokens/s end to end and decode only, tau,
peak memory (CUDA: the device's peak allocated in that pass; CPU: the process's peak
resident set so far), capture seconds, the prefill the engine ran (graphs, compiled or eager:
``fast.prefill_mode``).
Writes DIR/bench_batch.json after every configuration and prints a table. ``--tiny``: random
tiny models (fp32, CPU), random prompts: checks that the script runs, measures nothing.
``--ignore-eos``: every request decodes exactly ``--new`` tokens (for a side-by-side with
another engine at equal token counts); ``--save-prompts``: the prompt token ids as JSON
(``scripts/vllm_batch.py --prompts`` reads them). ``--random SIZE``: a random-weight target
of Qwen2.5 shapes (bf16, CUDA; ``scripts/gpu_speed.py``'s shapes) and random 128-token prompts,
target-only, EOS ignored: throughput against batch size without any weights to carry;
``--prompt-ids FILE`` gives it the first ``--prompts`` prompts of a ``--save-prompts`` file
instead (e.g. the real pair's, to see what their lengths cost).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

from cospec import fused
from cospec.batch_methods import engine_options, proposes
from cospec.errors import CospecError
from cospec.fast_batch import BatchEngine
from cospec.fast_batch_warm import warm_up
from cospec.methods import NO_DRAFT, Method, MethodOptions, build_method
from cospec.models import Pair
from cospec.sampling import SamplingConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from device_memory import peak_mb  # noqa: E402


def tiny_pair() -> tuple[torch.nn.Module, torch.nn.Module, list[list[int]], list[int]]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny import tiny_model

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 96, (int(n),), generator=g).tolist()
               for n in torch.randint(3, 20, (16,), generator=g)]
    return (tiny_model(1, dtype=torch.float32), tiny_model(2, layers=1, dtype=torch.float32),
            prompts, [])


def real_pair(args) -> tuple[torch.nn.Module, torch.nn.Module, list[list[int]], list[int]]:
    from cospec.methods import encode_prompt, eos_ids
    from cospec.models import load_pair
    from cospec.tasks import get_task

    pair = load_pair(args.target, args.draft)
    tasks = args.task.split(",")
    prompts = []
    for i, task in enumerate(tasks):  # --prompts shared out over the tasks
        n = args.prompts // len(tasks) + (i < args.prompts % len(tasks))
        split = args.split if task == "gsm8k" else "test"
        prompts += [encode_prompt(pair.tokenizer, p.prompt)
                    for p in get_task(task).problems(split)[:n]]
    return pair.target, pair.draft, prompts, eos_ids(pair.tokenizer, pair.target)


def random_target(args) -> tuple[torch.nn.Module, None, list[list[int]], list[int]]:
    from gpu_speed import random_model

    model = random_model(args.random)
    if args.prompt_ids:
        return model, None, json.loads(args.prompt_ids.read_text())[:args.prompts], []
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (args.prompts, 128), generator=g)
    return model, None, prompts.tolist(), []



METHODS = ("target", "spd", "lookup", "cos-we", "cos-cd", "we-sd", "cd-sd")
# the settings a run records when they are set
ENV = ("COSPEC_COMPILE", "COSPEC_PREFILL", "COSPEC_FUSED", "COSPEC_FUSED_ROWS", "COSPEC_LINEAR")


def batch_method(method: str, target, draft, args) -> Method:
    """``method`` built as ``cospec serve`` and ``cospec eval`` build it (``build_method``,
    ``--lam`` / ``--mu`` for CoS), for the engine ``batch_methods.engine_options`` sets up."""
    pair = Pair(target, draft, None, "target", "draft" if draft is not None else None)
    return build_method(method, pair, MethodOptions(lam=args.lam, mu=args.mu))


def one(target, draft, prompts, eos, rows: int, args, sampling: SamplingConfig,
        method: str) -> dict:
    """Capture the engine's graphs (``warm_up``), then decode all prompts once, timed."""
    device = next(target.parameters()).device
    room = max(map(len, prompts)) + args.new + max(args.k, 8) + 4
    m = batch_method(method, target, draft, args)
    opts = engine_options(m)
    if opts is None:
        raise SystemExit(f"{method}: no batch engine decodes it for these models")
    engine = BatchEngine(m.verifier, m.proposer, k=args.k, rows=rows, max_len=room, eos_ids=eos,
                         **opts)
    speculative = proposes(m)
    print(f"B={rows:3d} {method}: warm-up {warm_up(engine)}", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    for i, p in enumerate(prompts):
        engine.submit(p, args.new, sampling, seed=i)
    t0 = time.perf_counter()
    while engine.busy:
        engine.step()
    wall = time.perf_counter() - t0
    s = engine.stats
    return dict(rows=rows, method=method,
                prompts=len(prompts), generated=s.generated, prefill_s=s.prefill_s,
                decode_s=s.decode_s, wall_s=wall, tokens_per_s=s.generated / wall,
                decode_tokens_per_s=s.tokens_per_s, tau=s.tau if speculative else None,
                acceptance_rate=s.acceptance_rate if speculative else None,
                peak_mb=peak_mb(device), capture_s=sum(m.capture_s for m in engine.models),
                prefill=prefill_used(engine.models))


def prefill_used(models) -> str:
    """How the engine's models prefilled: "graphs", "compiled" or "eager" (all of them alike;
    "mixed" otherwise). The asked COSPEC_PREFILL is not it: a CPU engine prefills eagerly."""
    modes = {"graphs" if m.graph_prefill else "compiled" if m.compiled_prefill else "eager"
             for m in models}
    return modes.pop() if len(modes) == 1 else "mixed"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--target", default="qwen2.5-coder-1.5b")
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b")
    ap.add_argument("--task", default="gsm8k")
    ap.add_argument("--split", default="heldout")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--ignore-eos", action="store_true", help="decode exactly --new tokens")
    ap.add_argument("--save-prompts", type=Path, help="write the prompt token ids here")
    ap.add_argument("--random", choices=("0.5b", "1.5b", "7b"),
                    help="random-weight target of Qwen2.5 shapes, target-only (CUDA)")
    ap.add_argument("--prompt-ids", type=Path,
                    help="with --random: the prompts' token ids (a --save-prompts file)")
    ap.add_argument("--methods", default="target,spd", help=f"comma-separated: {METHODS}")
    ap.add_argument("--lam", type=float, default=0.5, help="CoS ensemble: lam q + (1-lam) p")
    ap.add_argument("--mu", type=float, default=0.1, help="CoS contrastive: l_p - mu l_q")
    ap.add_argument("--tiny", action="store_true", help="tiny random models on CPU (smoke)")
    ap.add_argument("--fused-set", action="append", default=[], metavar="NAME=VALUE",
                    help="a setting of cospec.fused, e.g. ROWS_TOKENS=32")
    args = ap.parse_args()
    try:
        fused.configure(args.fused_set)
    except CospecError as e:
        ap.error(str(e))
    methods = args.methods.split(",")
    if set(methods) - set(METHODS):
        ap.error(f"unknown methods {sorted(set(methods) - set(METHODS))}; choose from {METHODS}")
    if args.random and not torch.cuda.is_available():
        ap.error("--random builds its model on CUDA: no GPU here")
    if args.prompt_ids and not args.random:
        ap.error("--prompt-ids goes with --random (the other modes make their own prompts)")
    if args.prompt_ids and not args.prompt_ids.is_file():
        ap.error(f"--prompt-ids {args.prompt_ids}: no such file")
    if args.tiny:
        os.environ.setdefault("COSPEC_STATIC", "1")
        target, draft, prompts, eos = tiny_pair()
        prompts = prompts[:args.prompts]
    elif args.random:
        target, draft, prompts, eos = random_target(args)
    else:
        target, draft, prompts, eos = real_pair(args)
    if args.ignore_eos:
        eos = []
    if args.save_prompts:
        args.save_prompts.parent.mkdir(parents=True, exist_ok=True)
        args.save_prompts.write_text(json.dumps(prompts))
    sampling = SamplingConfig(temperature=args.temperature)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_batch.json"
    report = dict(target="tiny" if args.tiny else f"random-{args.random}" if args.random
                  else args.target, draft="tiny" if args.tiny else None if args.random
                  else args.draft, task=args.task, split=args.split,
                  new=args.new, k=args.k, ignore_eos=args.ignore_eos, temperature=args.temperature,
                  methods=methods, lam=args.lam, mu=args.mu,
                  device=str(next(target.parameters()).device),
                  dtype=str(next(target.parameters()).dtype),
                  env={v: os.environ[v] for v in ENV if v in os.environ},
                  fused_set=args.fused_set,
                  load_start=os.getloadavg(), runs=[])
    with torch.inference_mode():
        for rows in (int(b) for b in args.batches.split(",")):
            for method in methods if draft is not None else [m for m in methods
                                                             if m in NO_DRAFT]:
                run = one(target, draft, prompts, eos, rows, args, sampling, method)
                report["runs"].append(run)
                report["load_end"] = os.getloadavg()
                path.write_text(json.dumps(report, indent=1))
                print(f"B={rows:3d} {run['method']:6s} {run['tokens_per_s']:9.1f} tok/s "
                      f"(decode {run['decode_tokens_per_s']:9.1f}) tau "
                      f"{run['tau'] or 0:.2f} peak {run['peak_mb']:8.0f} MiB", flush=True)
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
