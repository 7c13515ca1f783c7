"""How much of the target's output a draft head over part of the vocabulary could propose.

    python scripts/draft_vocab_coverage.py --out DIR [--records NAME=FILE ...]
        [--sizes 2048,4096,...] [--k 5]

A draft whose lm_head keeps only N rows proposes only those N tokens; spd stays exact (the
target verifies), but a target token outside them ends the block. Over the target's own
greedy outputs (the committed ``accuracy.jsonl.gz`` records, method ``target``), for each
vocabulary of N tokens this gives:

- **token coverage**: the share of output tokens inside it;
- **k-window coverage**: the share of k consecutive output tokens all inside it (a block of
  k drafts that the vocabulary leaves whole, if the draft agrees with the target).

Three vocabularies a size: the first N ids (the tokenizer's merge order); the N most
frequent tokens of the *other* tasks' outputs (cross-task, so that no set ranks its own
tokens); and, as an upper bound only, the N most frequent of the very outputs scored (ties
and the rest by id). Writes DIR/draft_vocab_coverage.json and .md.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
from pathlib import Path

RECORDS = ("GSM8K heldout=results/gpu/gsm8k-heldout/accuracy.jsonl.gz",
           "HumanEval=results/gpu/humaneval/accuracy.jsonl.gz",
           "MBPP=results/gpu/mbpp/accuracy.jsonl.gz")


def outputs(path: Path) -> list[list[int]]:
    """The token ids of each target-only record in a JSONL(.gz) file."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r["token_ids"] for r in rows if r.get("method") == "target"]


def ranked(seqs: list[list[int]]) -> list[int]:
    """Token ids by frequency in ``seqs``, most frequent first (ties by id)."""
    counts = collections.Counter(t for s in seqs for t in s)
    return sorted(counts, key=lambda t: (-counts[t], t))


def coverage(seqs: list[list[int]], vocab: set[int], k: int) -> tuple[float, float]:
    """(share of tokens in ``vocab``, share of k-token windows wholly in it)."""
    tokens = inside = windows = whole = 0
    for s in seqs:
        flags = [t in vocab for t in s]
        tokens += len(flags)
        inside += sum(flags)
        for j in range(len(flags) - k + 1):
            windows += 1
            whole += all(flags[j:j + k])
    return inside / max(tokens, 1), whole / max(windows, 1)


def vocabulary(first: list[int], size: int) -> set[int]:
    """The first ``size`` ids of ``first`` (a ranking), then ids in order to fill it."""
    chosen = set(first[:size])
    t = 0
    while len(chosen) < size:
        chosen.add(t)
        t += 1
    return chosen


def markdown(res: dict) -> str:
    lines = [f"Target-only greedy outputs (committed records), k = {res['k']}: token coverage / "
             f"{res['k']}-window coverage of a draft vocabulary of N tokens.", "",
             "| outputs | tokens | vocabulary | " + " | ".join(f"N = {n:,}" for n in
                                                           res["sizes"]) + " |",
             "|---|---|---|" + "---|" * len(res["sizes"])]
    for name, r in res["sets"].items():
        for kind, cells in r["coverage"].items():
            lines.append(f"| {name} | {r['tokens']:,} | {kind} | " + " | ".join(
                f"{100 * c[0]:.2f} / {100 * c[1]:.1f} %" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--records", nargs="+", default=list(RECORDS), metavar="NAME=FILE")
    p.add_argument("--sizes", default="2048,4096,8192,16384,32768,65536")
    p.add_argument("--k", type=int, default=5)
    args = p.parse_args()
    try:
        sizes = [int(x) for x in args.sizes.split(",")]
    except ValueError:
        p.error(f"--sizes: comma-separated integers, got {args.sizes!r}")
    if args.k < 1 or not sizes or min(sizes) < 1:
        p.error("--k and every size: at least 1")
    sets = {}
    for item in args.records:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            p.error(f"--records: NAME=FILE with an existing file, got {item!r}")
        sets[name] = outputs(Path(path))
        if not sets[name]:
            p.error(f"{path}: no target-only records")
    if len(sets) < 2:
        p.error("--records: two sets or more (each is ranked by the others)")
    res = {"k": args.k, "sizes": sizes, "sets": {}}
    for name, seqs in sets.items():
        others = ranked([s for other, ss in sets.items() if other != name for s in ss])
        kinds = {"first N ids": list(range(max(sizes))),
                 "N most frequent in the others": others,
                 "N most frequent in these (optimistic: ranked on what it scores)":
                     ranked(seqs)}
        res["sets"][name] = {
            "tokens": sum(map(len, seqs)), "outputs": len(seqs),
            "coverage": {kind: [coverage(seqs, vocabulary(order, n), args.k) for n in sizes]
                         for kind, order in kinds.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "draft_vocab_coverage.json").write_text(json.dumps(res, indent=1))
    (args.out / "draft_vocab_coverage.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
