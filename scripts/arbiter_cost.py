"""Cost of a CoSpec arbiter decision on the GPU: features from target/draft logit rows + the
shipped policy, for one mismatch row and for a block's five rows at once, eager and as a
replayed CUDA graph (``cospec.arbiter.GraphedRowStats``):
``PYTHONPATH=. python scripts/arbiter_cost.py``."""

import json
import os
import sys
import time

import torch

from cospec import arbiter
from cospec.acceptance import ArbiterRule, Proposal
from cospec.methods import SHIPPED_ARBITER


def timed(fn, reps=500) -> float:
    """Milliseconds per call, warm (the first calls compile)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


if not torch.cuda.is_available():
    sys.exit("arbiter_cost.py measures an arbiter call on the GPU: it needs CUDA")
rule = ArbiterRule(arbiter.load_arbiter(SHIPPED_ARBITER))
g = torch.Generator(device="cuda").manual_seed(0)
tl, dl = (torch.randn(6, 151936, device="cuda", generator=g) * 3 for _ in range(2))
prop = Proposal(tokens=[5, 7, 9, 11, 13], draft_logits=dl[:5], target_logits=tl, position=40)
best = [1, 2, 3, 4, 6, 8]
res = {"device": torch.cuda.get_device_name()}
for mode in ("eager", "graphed"):
    os.environ["COSPEC_EAGER"] = "1" if mode == "eager" else "0"
    res[mode] = {"decide_1_row_ms": timed(lambda: rule._decide(prop, [1], best)),
                 "decide_5_rows_ms": timed(lambda: rule._decide(prop, [0, 1, 2, 3, 4], best)),
                 "features_1_row_ms": timed(lambda: arbiter.mismatch_features(
                     tl[1:2], dl[1:2], torch.tensor([5]), torch.tensor([7]),
                     torch.tensor([40])))}
feats = arbiter.mismatch_features(tl[1:2], dl[1:2], torch.tensor([5]), torch.tensor([7]),
                                  torch.tensor([40]))
res["policy_cpu_ms"] = timed(lambda: rule.policy.draft_prob(feats))
print(json.dumps(res))
