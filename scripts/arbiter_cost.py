"""Cost of one CoSpec arbiter call on the GPU (features from two [1, V] logit rows + the
shipped policy), against the previous feature code that copied each statistic to the host
separately (10 synchronisations per call): ``PYTHONPATH=. python scripts/arbiter_cost.py``."""

import json
import sys
import time

import torch

from cospec.acceptance import ArbiterRule
from cospec.arbiter import load_arbiter, mismatch_features
from cospec.methods import SHIPPED_ARBITER


def per_stat_copies(t_logits, d_logits, t, d, position):
    """The previous implementation's transfers: each statistic to the host on its own."""
    rows = torch.arange(1)
    out = []
    for logits in (t_logits, d_logits):
        logp = logits.float().log_softmax(-1)
        p = logp.exp()
        top = p.topk(5, dim=-1).values
        out += [logp[rows, t.to(logp.device)].cpu(), logp[rows, d.to(logp.device)].cpu(),
                -(p * logp).nan_to_num().sum(-1).cpu(), (top[:, 0] - top[:, 1]).cpu(),
                top.sum(-1).cpu()]
    return torch.stack(out + [torch.log1p(position.float())], dim=-1)


def timed(fn, reps=500) -> float:
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
compiled = torch.compile(mismatch_features)  # a variant to try: fused kernels
rule = ArbiterRule(load_arbiter(SHIPPED_ARBITER))
g = torch.Generator(device="cuda").manual_seed(0)
tl, dl = (torch.randn(6, 151936, device="cuda", generator=g) * 3 for _ in range(2))
args = (torch.tensor([5]), torch.tensor([7]), torch.tensor([40]))
res = {"device": torch.cuda.get_device_name(),
       "keep_draft_ms": timed(lambda: rule._keep_draft(tl[1:2], dl[1:2], 5, 7, 40, None, None)),
       "features_ms": timed(lambda: mismatch_features(tl[1:2], dl[1:2], *args)),
       "features_compiled_ms": timed(lambda: compiled(tl[1:2], dl[1:2], *args)),
       "features_per_stat_copies_ms": timed(lambda: per_stat_copies(tl[1:2], dl[1:2], *args))}
print(json.dumps(res))
