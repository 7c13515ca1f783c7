"""Cost of a CoSpec arbiter decision on the GPU:
``PYTHONPATH=. python scripts/arbiter_cost.py [--tokens 256]``.

- alone: features from one target/draft logit row pair + the shipped policy
  (``ArbiterRule._keep_draft``), eager and as a replayed CUDA graph
  (``cospec.arbiter.GraphedRowStats``), warm, in a tight loop;
- a block's features at once (``block_stats`` + ``unpack_block``, k = 5, with its copy to
  the host), and a decision given them;
- in the loop: CoSpec decoding with random-weight Qwen2.5 1.5B / 0.5B shapes (bf16, fast
  path, k = 5, ``--tokens``), features per mismatch (with a breakdown: row statistics and
  their copy, the policy) and for the whole block with the step's one copy (the CUDA
  default): random models disagree at nearly every block, so nearly every step asks the
  arbiter once; reports the time per decision and its share of decode time.
"""

import argparse
import json
import os
import sys
import time

import torch

from cospec import arbiter
from cospec.acceptance import ArbiterRule, Proposal
from cospec.arbiter import load_arbiter
from cospec.decoding import generate
from cospec.methods import SHIPPED_ARBITER
from cospec.stats import DecodeStats


def timed(fn, reps=500) -> float:
    """Milliseconds per call, warm."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--tokens", type=int, default=256, help="tokens generated in the loop part")
args = ap.parse_args()
if not torch.cuda.is_available():
    sys.exit("arbiter_cost.py measures an arbiter call on the GPU: it needs CUDA")
from gpu_speed import random_model  # noqa: E402  (scripts/ is on the path when run as a script)

rule = ArbiterRule(load_arbiter(SHIPPED_ARBITER))
g = torch.Generator(device="cuda").manual_seed(0)
tl, dl = (torch.randn(6, 151936, device="cuda", generator=g) * 3 for _ in range(2))
prop = Proposal(tokens=[5, 7, 9, 11, 13], draft_logits=dl[:5], target_logits=tl, position=40)
res = {"device": torch.cuda.get_device_name()}
for mode in ("eager", "graphed"):
    os.environ["COSPEC_EAGER"] = "1" if mode == "eager" else "0"
    res[f"decision_ms_{mode}"] = timed(lambda: rule._keep_draft(prop, 1, 3))
os.environ.pop("COSPEC_EAGER")
ids = torch.tensor(prop.tokens, device="cuda")  # the loop has the drafted ids on the device
res["block_ms"] = timed(lambda: arbiter.unpack_block(
    arbiter.block_stats(tl, dl[:5], ids).cpu().numpy(), 5, 40))
block = arbiter.unpack_block(arbiter.block_stats(tl, dl[:5], ids).cpu().numpy(), 5, 40)[1]
res["decision_given_block_ms"] = timed(lambda: rule._keep_draft(prop, 1, 3, block))
target, draft = random_model("1.5b"), random_model("0.5b")
prompt = torch.randint(1000, 100000, (128,), generator=torch.Generator().manual_seed(0)).tolist()
spent = {"row_stats": 0.0, "policy": 0.0}  # seconds inside the two pieces, in the loop


def clocked(name, fn):
    def wrapper(*a):
        t0 = time.perf_counter()
        out = fn(*a)
        spent[name] += time.perf_counter() - t0
        return out
    return wrapper


def in_loop(whole_block: bool, breakdown: bool) -> dict:
    rule.whole_block = whole_block
    for _ in range(2):  # the first run captures the graphs; the second is measured
        stats = DecodeStats()
        spent.update(row_stats=0.0, policy=0.0)
        list(generate(target, draft, prompt, rule, k=5, max_new_tokens=args.tokens,
                      stats=stats))
    n = max(stats.arbiter_calls, 1)
    out = {"decisions": stats.arbiter_calls, "steps": stats.steps,
           "ms_per_decision": 1e3 * stats.arbiter_s / n,
           "share_of_decode": stats.arbiter_s / stats.decode_s,
           "tokens_per_s": stats.tokens_per_s}
    if breakdown:
        out.update(of_which_row_stats_ms=1e3 * spent["row_stats"] / n,
                   of_which_policy_ms=1e3 * spent["policy"] / n)
    return out


res["in_loop_whole_block"] = in_loop(True, False)
res["in_loop_per_mismatch"] = in_loop(False, False)
# the breakdown's timers read the row statistics back at once (a sync of their own)
arbiter.row_stats = clocked("row_stats", lambda *a, f=arbiter.row_stats: f(*a).cpu())
rule.policy.draft_prob = clocked("policy", rule.policy.draft_prob)
res["in_loop_per_mismatch_timed"] = in_loop(False, True)
print(json.dumps(res))
