"""What an 8-bit draft would cost in acceptance: spd's τ on the shipped pair with the draft's
weights rounded to 8 bits, against the draft as shipped.

    PYTHONPATH=. python scripts/draft_quant_tau.py --out DIR [--prompts 10] [--new 128]
        [--k 5] [--formats fp8,int8] [--tasks gsm8k,humaneval]

An 8-bit draft reads half the bytes of a bf16 one a step: its lm_head (a third of a 0.5B
draft's weight bytes) and every projection. Speed is a GPU question; acceptance is not, so
this measures it where it can run (the CPU, float32): every linear weight of the draft and
its lm_head (untied from the embedding, which stays exact) is rounded with one scale per
output row (absmax), to FP8 e4m3 (scale = absmax / 448) or int8 (absmax / 127), and turned
back to float32, which is what a kernel that dequantizes a row's products would compute up
to summation order. For each task, the first ``--prompts`` problems (GSM8K heldout,
HumanEval test; chat template), greedy spd at k = ``--k``, ``--new`` tokens at most, EOS
respected. Reports τ (tokens a target pass), the acceptance rate and, as a check of
exactness, how many outputs equal the shipped draft's (spd's output is the target's
whatever the draft). Each (task, format) is saved when done; a rerun skips those in
DIR/draft_quant_tau.json. Writes DIR/draft_quant_tau.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from gpu_speed import PAIR, task_prompts  # noqa: E402

from cospec.decoding import generate  # noqa: E402
from cospec.methods import MethodOptions, build_method, eos_ids  # noqa: E402
from cospec.models import load_pair  # noqa: E402
from cospec.sampling import GREEDY  # noqa: E402
from cospec.stats import DecodeStats  # noqa: E402

TASKS = ("gsm8k", "humaneval", "mbpp")  # task_prompts': GSM8K heldout, the others' test
TOP = {"fp8": 448.0, "int8": 127.0}  # the largest magnitude of each format


def rounded(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """w [out, in] rounded to ``fmt`` with one absmax scale per output row, back in w's
    dtype."""
    scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / TOP[fmt]
    if fmt == "fp8":
        q = (w / scale).to(torch.float8_e4m3fn).to(w.dtype)
    else:
        q = (w / scale).round().clamp(-127, 127)
    return q * scale


def quantized(draft: torch.nn.Module, fmt: str) -> torch.nn.Module:
    """A copy of ``draft`` whose linear weights and lm_head are ``rounded``; the embedding
    stays exact (the lm_head is untied from it first)."""
    q = copy.deepcopy(draft)
    with torch.no_grad():
        for module in q.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight = torch.nn.Parameter(rounded(module.weight.detach().clone(), fmt),
                                                   requires_grad=False)
    q.config.tie_word_embeddings = False
    return q


def run(pair, prompts: list[list[int]], args) -> dict:
    """spd over ``prompts``: the stats summed over them and the outputs."""
    method = build_method("spd", pair, MethodOptions())
    eos, total = eos_ids(pair.tokenizer, pair.target), DecodeStats()  # generate adds to it
    outputs = [[t.id for t in generate(method.verifier, method.proposer, prompt, method.rule,
                                       k=args.k, max_new_tokens=args.new, sampling=GREEDY,
                                       eos_ids=eos, stats=total)]
               for prompt in tqdm(prompts, desc="prompts", leave=False)]
    return {"tau": total.tau, "acceptance_rate": total.acceptance_rate, "steps": total.steps,
            "drafted": total.drafted, "accepted": total.accepted,
            "generated": total.generated, "outputs": outputs}


def markdown(out: dict) -> str:
    lines = [f"# spd's τ with an 8-bit draft ({out['machine']})", "",
             f"Command: `{out['command']}`", "",
             f"Target {PAIR[0]}, draft {PAIR[1]}, float32 on the CPU, greedy, k = {out['k']}, "
             f"≤ {out['new']} new tokens, EOS respected; the draft's linear weights and "
             "lm_head rounded with one absmax scale per output row.", "",
             "| task | draft | prompts | tokens | τ | ÷ shipped | acceptance "
             "| outputs = shipped's |",
             "|---|---|---|---|---|---|---|---|"]
    for task, runs in out["tasks"].items():
        base = runs.get("shipped")
        for fmt, r in runs.items():
            n = len(r["outputs"])
            ratio = f"{r['tau'] / base['tau']:.3f}" if base else "—"
            same = (f"{sum(a == b for a, b in zip(r['outputs'], base['outputs']))}/{n}"
                    if base else "—")
            lines.append(f"| {task} | {fmt} | {n} | {r['generated']} | {r['tau']:.3f} | "
                         f"{ratio} | {r['acceptance_rate']:.3f} | {same} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--prompts", type=int, default=10)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--formats", default="fp8,int8")
    p.add_argument("--tasks", default="gsm8k,humaneval")
    args = p.parse_args()
    for fmt in args.formats.split(","):
        if fmt not in TOP:
            sys.exit(f"--formats: {fmt!r} is not one of {', '.join(TOP)}")
    for task in args.tasks.split(","):
        if task not in TASKS:
            sys.exit(f"--tasks: {task!r} is not one of {', '.join(TASKS)}")
    if args.prompts < 1 or args.new < 1 or args.k < 1:
        sys.exit("--prompts, --new and --k must be >= 1")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "draft_quant_tau.json"
    out = json.loads(path.read_text()) if path.exists() else {"tasks": {}}
    out |= {"command": " ".join(["python", *sys.argv]), "k": args.k, "new": args.new,
            "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}"}
    pair = load_pair(*PAIR, device="cpu", dtype=torch.float32)
    drafts = {"shipped": pair.draft} | {f: None for f in args.formats.split(",")}
    for task in args.tasks.split(","):
        prompts = task_prompts(pair.tokenizer, task, args.prompts)
        runs = out["tasks"].setdefault(task, {})
        for fmt in drafts:
            if fmt in runs:
                continue
            if drafts[fmt] is None:
                drafts[fmt] = quantized(pair.draft, fmt)
            t0 = time.perf_counter()
            runs[fmt] = run(dataclasses.replace(pair, draft=drafts[fmt]), prompts, args)
            runs[fmt]["wall_s"] = time.perf_counter() - t0
            print(task, fmt, f"tau {runs[fmt]['tau']:.3f}", flush=True)
            path.write_text(json.dumps(out))
            (args.out / "draft_quant_tau.md").write_text(markdown(out))


if __name__ == "__main__":
    main()
