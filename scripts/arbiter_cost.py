"""Cost of one CoSpec arbiter call on the GPU (features from two [1, V] logit rows + the
shipped policy), and of its pieces: ``PYTHONPATH=. python scripts/arbiter_cost.py``."""

import json
import sys
import time

import torch

from cospec import arbiter
from cospec.acceptance import ArbiterRule
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
args = (torch.tensor([5]), torch.tensor([7]), torch.tensor([40]))
res = {"device": torch.cuda.get_device_name()}
res["call_ms"] = timed(lambda: rule._keep_draft(tl[1:2], dl[1:2], 5, 7, 40, None, None))
res["features_ms"] = timed(lambda: arbiter.mismatch_features(tl[1:2], dl[1:2], *args))
res["features"] = arbiter.mismatch_features(tl[1:2], dl[1:2], *args)[0].tolist()
print(json.dumps(res))

# where a call's time goes (each piece alone, warm)
two = torch.cat([tl[1:2], dl[1:2]])
logp = two.log_softmax(-1)
idx = torch.tensor([[5], [7]], device="cuda")
feats = arbiter.mismatch_features(tl[1:2], dl[1:2], *args)
res["parts_ms"] = {
    "log_softmax": timed(lambda: two.log_softmax(-1)),
    "topk5": timed(lambda: logp.topk(5, dim=-1)),
    "topk5_chunked": timed(lambda: logp.view(2, 128, -1).topk(5, dim=-1).values.view(2, -1)
                           .topk(5, dim=-1)),
    "entropy": timed(lambda: -(logp.exp() * logp).nan_to_num().sum(-1)),
    "gather": timed(lambda: logp.gather(1, idx)),
    "h2d_ids": timed(lambda: torch.stack([args[0], args[1]]).to("cuda")),
    "d2h_13": timed(lambda: logp[:, :13].cpu()),
    "policy_cpu": timed(lambda: rule.policy.draft_prob(feats)),
}
print(json.dumps(res["parts_ms"]))
