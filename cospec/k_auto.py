"""``--k auto``: the draft length predicted fastest for a pair on this machine, from the
pair's own timed forward passes (``forward_cost``), cached per machine and models."""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from cospec import cpu_int8
from cospec.assets import cache_dir, write_atomic
from cospec.cpu import TRIALS
from cospec.decoding import CachedLM
from cospec.errors import CospecError


def forward_cost(model, k: int, prefix: int, reps: int, mode: str) -> float:
    """Median seconds of a cached forward over k tokens after ``prefix`` tokens, with CPU
    linear mode ``mode`` (``auto``: timed once the order is chosen)."""
    if k < 1 or prefix < 0 or reps < 1:
        raise CospecError(f"a forward cost needs k >= 1 tokens, a prefix >= 0 and reps >= 1 "
                          f"(got k {k}, prefix {prefix}, reps {reps})")
    before = os.environ.get("COSPEC_LINEAR")
    os.environ["COSPEC_LINEAR"] = mode  # read by cpu.fast_linear
    lm = CachedLM(model)
    g = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(min(100, vocab // 2), min(5000, vocab), (prefix + k,),
                        generator=g).tolist()
    times = []
    with torch.inference_mode():
        lm.prefill(ids[:prefix])
        warm = 1 + (2 * TRIALS if mode == "auto" else 0)  # the choice's own timed forwards
        for rep in range(reps + warm):
            t0 = time.perf_counter()
            lm.forward(ids[prefix:], keep=k)
            if lm.device.type == "cuda":
                torch.cuda.synchronize()
            if rep >= warm:
                times.append(time.perf_counter() - t0)
            lm.crop(prefix)
    if before is None:
        os.environ.pop("COSPEC_LINEAR")
    else:
        os.environ["COSPEC_LINEAR"] = before
    return statistics.median(times)


def machine() -> str:
    """The CPU model (from /proc/cpuinfo where there is one), core count and torch version."""
    import platform

    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        name = next((line.split(":", 1)[1].strip() for line in lines
                     if line.startswith("model name")), name)
    return f"{name}, {os.cpu_count()} cores, torch {torch.__version__}"


def best_k(target_s: dict[int, float], draft_s: float, alpha: float) -> tuple[int, float]:
    """The draft length with the most tokens per second, and its predicted speedup over
    target-only decoding, from measured forward costs (``target_s[n]``: the target over n
    tokens; ``draft_s``: one draft step) if each draft token is accepted with probability
    ``alpha``: a block of k drafts costs k draft steps + a verify over k + 1 tokens and
    commits (1 - alpha^(k+1)) / (1 - alpha) tokens on average."""
    if 1 not in target_s or not any(n > 1 for n in target_s):
        raise CospecError("predicting a draft length needs the target's cost over 1 token and "
                          "over k + 1 tokens for some k >= 1 (timed: "
                          f"{', '.join(map(str, sorted(target_s))) or 'none'})")
    speed = {k: (1 - alpha ** (k + 1)) / (1 - alpha) / (k * draft_s + target_s[k + 1])
             for k in range(1, max(target_s)) if k + 1 in target_s}
    k = max(speed, key=speed.get)
    return k, speed[k] * target_s[1]


AUTO_ALPHA = 0.85   # per-token acceptance assumed by --k auto (GSM8K: tau 2.70 at k = 2,
                    # 3.95 at k = 4 on the default pair, i.e. alpha = 0.85-0.9)
AUTO_KS = range(1, 8)  # --k auto picks k in 1..6 (a verify over k + 1 <= 7 tokens)


def cached_costs(entry) -> tuple[dict[int, float], float] | None:
    """``(target_s, draft_s)`` of a ``k-auto.json`` entry, as ``best_k`` takes them; None
    where the entry is not what ``auto_k`` writes (positive seconds, the target's timed over
    1 token and more)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("target_s"), dict):
        return None
    try:
        target_s = {int(n): float(t) for n, t in entry["target_s"].items()}
        draft_s = float(entry.get("draft_s"))
    except (TypeError, ValueError, OverflowError):
        return None
    if not all(t > 0 and math.isfinite(t) for t in (*target_s.values(), draft_s)):
        return None
    if 1 not in target_s or not any(n > 1 for n in target_s):
        return None
    return target_s, draft_s


def auto_k(pair, alpha: float = AUTO_ALPHA) -> int:
    """The draft length ``best_k`` predicts fastest for ``pair`` on this machine, from the
    pair's own forward costs (CPU only: on CUDA the fast path's costs are not these).

    Timed once per machine, models, dtype, thread count, ``COSPEC_LINEAR`` and draft
    weights (its int8 copies, ``cospec.cpu_int8``, or its own); the costs are
    kept in the cache folder (``k-auto.json``), so later runs reuse the same k."""
    param = next(pair.target.parameters())
    if param.device.type != "cpu":
        raise CospecError("--k auto times CPU forwards; on a GPU give a number (the GPU "
                          "results use --k 5)")
    mode = os.environ.get("COSPEC_LINEAR", "auto")
    key = " | ".join([machine(), pair.target_name, str(pair.draft_name), str(param.dtype),
                      f"{torch.get_num_threads()} threads", f"linear {mode}"]
                     + (["int8 draft"] if cpu_int8.has_copies(pair.draft) else []))
    path = cache_dir() / "k-auto.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or cut by a crash: timed again
        known = {}
    if not isinstance(known, dict):
        known = {}
    costs = cached_costs(known.get(key))
    if costs is None:  # not timed yet, or an entry not as written here: timed again
        print("--k auto: timing the pair's forwards once on this machine ...", file=sys.stderr,
              flush=True)
        costs = ({n: forward_cost(pair.target, n, 128, 3, mode) for n in AUTO_KS},
                 forward_cost(pair.draft, 1, 128, 3, mode))
        known[key] = {"target_s": costs[0], "draft_s": costs[1]}
        write_atomic(path, lambda tmp: tmp.write_text(json.dumps(known, indent=1)))
    k, speedup = best_k(*costs, alpha)
    print(f"--k auto: k = {k} (predicted {speedup:.2f}x target-only at acceptance {alpha}; "
          f"costs in {path})", file=sys.stderr, flush=True)
    return k
