"""What prompt lookup (n-gram) proposals could give greedy spd on the shipped pair, offline.

    python scripts/prompt_lookup_bound.py --out DIR [--k 5] [--ngram 3]

Prompt lookup proposes, with no draft model, the tokens that followed the last earlier
occurrence of the sequence's last n tokens (n = NGRAM down to 1) in the prompt and the
output so far (transformers' ``prompt_lookup_num_tokens``, vLLM's ``ngram``). Greedy spd
with such proposals is still exact: the target verifies them.

Replayed here along the target's own greedy outputs (the committed ``accuracy.jsonl.gz``
records of method ``target``: GSM8K heldout, HumanEval, MBPP; prompts through the target's
chat template as ``cospec eval`` builds them), block by block: at each block's start the
lookup proposes up to k tokens, the target accepts the longest prefix equal to its own next
tokens and adds one of its own. Per task:

- **match rate**: the share of blocks in which the lookup proposed anything;
- **τ where matched**: tokens a verify emits in those blocks (1 + accepted);
- **τ lookup alone**: tokens a verify emits over every block (1 where nothing matched);
- **free tokens**: the share of output tokens that matched blocks accepted (tokens no draft
  step proposed).

Then, with the per-step costs measured on an H200 (the fused layers, bf16, position 100:
results/gpu/h200/fused-few-row-attention-chunks/defaults.md; a verify of 3-6 rows costed as
6), the kernel bound of three schedules against target-only (a block that proposes nothing
is a one-row target step):
the lookup alone, spd with the draft (τ from the measured real-pair runs) and a hybrid that
verifies the lookup's proposal where it offers at least ``--min-match`` tokens (default k, a
whole block: ``spd-lookup``'s rule) and runs the draft's block otherwise (the draft then
catches up on the accepted tokens in its next first step, one few-row step). The hybrid's
draft blocks are assumed to accept as spd's do.
Writes DIR/prompt_lookup_bound.json and .md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
from pathlib import Path

from cospec.lookup import NgramIndex

RECORDS = {"GSM8K heldout": ("gsm8k", "heldout", "results/gpu/gsm8k-heldout/accuracy.jsonl.gz"),
           "HumanEval": ("humaneval", "test", "results/gpu/humaneval/accuracy.jsonl.gz"),
           "MBPP": ("mbpp", "test", "results/gpu/mbpp/accuracy.jsonl.gz")}
# ms a step on an H200 (bf16, fused, position 100, the defaults):
# results/gpu/h200/fused-few-row-attention-chunks/defaults.md
COST = {"draft1": 0.535, "draft2": 0.762, "target1": 1.171, "target2": 1.529, "verify6": 1.577}
SPD_TAU = {"GSM8K heldout": 4.97, "HumanEval": 5.69}  # spd-graph's τ at k = 5 (same README)


def lookup(index: NgramIndex, prompt: list[int], out: list[int], i: int, k: int) -> list[int]:
    """The method's own proposal (``cospec.lookup.NgramIndex``) of up to k tokens after
    prompt + out[:i]; ``index`` has indexed a prefix of that and only grows."""
    index.sync(prompt + out[:i])
    return index.propose(k)


def kept(proposal: list[int], out: list[int], i: int) -> int:
    """How many of ``proposal`` the target keeps at out[i:]: the prefix equal to its own."""
    n = 0
    while n < len(proposal) and i + n < len(out) and proposal[n] == out[i + n]:
        n += 1
    return n


def replay(prompt: list[int], out: list[int], k: int, ngram: int) -> list[tuple[int, int]]:
    """(proposed, accepted) for each block of greedy spd with lookup proposals along ``out``
    (the target's greedy continuation of ``prompt``)."""
    blocks, i, index = [], 0, NgramIndex(ngram)
    while i < len(out):
        proposal = lookup(index, prompt, out, i, k)
        accepted = kept(proposal, out, i)
        blocks.append((len(proposal), accepted))
        i += accepted + 1
    return blocks


def summary(blocks: list[tuple[int, int]], tokens: int) -> dict:
    matched = [a for p, a in blocks if p > 0]
    return {"blocks": len(blocks), "tokens": tokens,
            "match_rate": len(matched) / len(blocks),
            "tau_matched": 1 + statistics.fmean(matched) if matched else 1.0,
            "tau_alone": tokens / len(blocks),
            "free_tokens": sum(matched) / tokens,
            "accepted_hist": {str(a): sum(1 for m in matched if m == a) for a in range(0, 11)}}


def spd_block_ms(k: int) -> float:
    """A k-draft spd block: the draft's 2-row first step, k - 1 one-row steps, the verify."""
    return COST["draft2"] + (k - 1) * COST["draft1"] + COST["verify6"]


def verify_ms(proposed: int) -> float:
    """A target pass over 1 + ``proposed`` rows (3-6 rows: the 6-row step's time)."""
    return (COST["target1"], COST["target2"])[proposed] if proposed < 2 else COST["verify6"]


def hybrid(prompt: list[int], out: list[int], k: int, ngram: int, min_match: int,
           tau: float) -> tuple[float, int]:
    """(ms, tokens) of the hybrid along ``out``: where the lookup proposes at least
    ``min_match`` tokens, a verify of them (and a row more for the draft to catch up on in
    its next first step); elsewhere a draft block of k proposals, taken to emit round(tau)
    tokens (spd's mean) at spd's block cost."""
    ms, i, index = 0.0, 0, NgramIndex(ngram)
    catch_up = COST["draft2"] - COST["draft1"]
    while i < len(out):
        proposal = lookup(index, prompt, out, i, k)
        if len(proposal) >= min_match:
            ms += verify_ms(len(proposal)) + catch_up
            i += kept(proposal, out, i) + 1
        else:
            ms += spd_block_ms(k)
            i += round(tau)
    return ms, len(out)


def bound(task: str, blocks_by_problem: list[list[tuple[int, int]]], k: int,
          hybrid_ms: float | None, hybrid_tokens: int) -> dict:
    """The kernel bound (target-only time ÷ schedule time, both in COST's step times) of the
    lookup alone, spd (τ measured) and the hybrid on one task."""
    tokens = sum(sum(a + 1 for _, a in b) for b in blocks_by_problem)
    out = {"lookup_alone": tokens * COST["target1"]
           / sum(verify_ms(p) for b in blocks_by_problem for p, _ in b)}
    tau = SPD_TAU.get(task)
    if tau is not None:
        out["spd"] = tau * COST["target1"] / spd_block_ms(k)
        out["hybrid"] = hybrid_tokens * COST["target1"] / hybrid_ms
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--ngram", type=int, default=3)
    p.add_argument("--min-match", type=int, default=None,
                   help="the hybrid verifies a lookup proposal of at least this many tokens "
                        "(default k)")
    a = p.parse_args(argv)
    if a.k < 1 or a.ngram < 1 or (a.min_match is not None and a.min_match < 1):
        p.error("--k, --ngram and --min-match must be >= 1")
    a.min_match = a.min_match or a.k
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from cospec.methods import encode_prompt
    from cospec.models import DEFAULT_TARGET, resolve
    from cospec.tasks import get_task

    tok = AutoTokenizer.from_pretrained(resolve(DEFAULT_TARGET))
    res = {"k": a.k, "ngram": a.ngram, "min_match": a.min_match, "cost_ms": COST,
           "spd_tau": SPD_TAU, "tasks": {}}
    for name, (task, split, path) in RECORDS.items():
        prompts = {pr.id: pr.prompt for pr in get_task(task).problems(split)}
        with gzip.open(path, "rt") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        per, h_ms, h_tokens = [], 0.0, 0
        for r in tqdm(rows, desc=name, leave=False):
            if r.get("method") != "target":
                continue
            out = r["token_ids"]
            out = json.loads(out) if isinstance(out, str) else out
            prompt = encode_prompt(tok, prompts[r["id"]])
            per.append(replay(prompt, out, a.k, a.ngram))
            if name in SPD_TAU:
                ms, n = hybrid(prompt, out, a.k, a.ngram, a.min_match, SPD_TAU[name])
                h_ms, h_tokens = h_ms + ms, h_tokens + n
        flat = [b for bs in per for b in bs]
        tokens = sum(acc + 1 for _, acc in flat)
        res["tasks"][name] = summary(flat, tokens) | {"problems": len(per)} \
            | {"bound": bound(name, per, a.k, h_ms, h_tokens)}
        print(name, json.dumps(res["tasks"][name]["bound"]), flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "prompt_lookup_bound.json").write_text(json.dumps(res, indent=1))
    lines = [f"Prompt lookup along the target's greedy outputs: k = {a.k}, n-grams of up to "
             f"{a.ngram} tokens; bounds from H200 step times {COST} (ms)", "",
             "| task | problems | blocks | match rate | τ where matched | τ lookup alone | "
             "free tokens | bound: lookup alone | spd | hybrid |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, t in res["tasks"].items():
        b = t["bound"]
        lines.append(f"| {name} | {t['problems']} | {t['blocks']} | {t['match_rate']:.0%} | "
                     f"{t['tau_matched']:.2f} | {t['tau_alone']:.2f} | {t['free_tokens']:.0%} | "
                     f"{b['lookup_alone']:.2f}× | "
                     + (f"{b['spd']:.2f}× | {b['hybrid']:.2f}× |" if "spd" in b else "— | — |"))
    (a.out / "prompt_lookup_bound.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
