"""Cost of a CoSpec arbiter decision on the GPU:
``PYTHONPATH=. python scripts/arbiter_cost.py [--tokens 256]``.

- alone, warm, in a tight loop: a decision of the shipped policy on one target/draft logit
  row pair (``ArbiterRule._keep_draft``) as one CUDA graph (``arbiter.GraphedDecision``,
  the default) and on the host path (row statistics eager or as a replayed graph,
  ``arbiter.GraphedRowStats``, then features and policy on the host); the device time of
  the row statistics (CUDA events), and of a candidate with chunked reductions;
- in the loop: CoSpec decoding with random-weight Qwen2.5 1.5B / 0.5B shapes (bf16, fast
  path, k = 5, ``--tokens``): random models disagree at nearly every block, so nearly every
  step asks the arbiter once; reports the time per decision and its share of decode time,
  for the graphed decision and the host path, then the host path with each piece timed:
  preparing the ids, queuing the row statistics, waiting for them and copying them back,
  combining the features, the policy.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from cospec import arbiter
from cospec.acceptance import Proposal
from cospec.arbiter import ArbiterRule, load_arbiter
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


def device_ms(fn, reps=200) -> float:
    """Device milliseconds per call (CUDA events around the queued work), warm."""
    for _ in range(20):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--tokens", type=int, default=256, help="tokens generated in the loop part")
args = ap.parse_args()
if not torch.cuda.is_available():
    sys.exit("arbiter_cost.py measures an arbiter call on the GPU: it needs CUDA")
from gpu_speed import random_model  # noqa: E402  (scripts/ is on the path when run as a script)

rule = ArbiterRule(load_arbiter(SHIPPED_ARBITER))
g = torch.Generator(device="cuda").manual_seed(0)
tl, dl = (torch.randn(6, 151936, device="cuda", generator=g).bfloat16() * 3 for _ in range(2))
prop = Proposal(tokens=[5, 7, 9, 11, 13], draft_logits=dl[:5], target_logits=tl, position=40)
res = {"device": torch.cuda.get_device_name()}
rule.graphed = False  # the host path: row statistics on the device, the rest on the host
for mode in ("eager", "graphed"):
    os.environ["COSPEC_EAGER"] = "1" if mode == "eager" else "0"
    res[f"decision_ms_host_{mode}_stats"] = timed(lambda: rule._keep_draft(prop, 1, 3))
os.environ.pop("COSPEC_EAGER")
rule.graphed = True
res["decision_ms_graphed_decision"] = timed(lambda: rule._keep_draft(prop, 1, 3))
ids = torch.tensor([[3, 7], [3, 7]])
res["row_stats_device_ms"] = device_ms(lambda: arbiter.row_stats([tl[1:2], dl[1:2]], ids))


def row_stats_split(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """A candidate ``_row_stats`` whose vocabulary-wide reductions run over 128 chunks per
    row first (many blocks, not one per row); entropy as lse - E_p[x]."""
    x = logits.float()
    r = x.shape[0]
    m = x.view(r, 128, -1).amax(-1).amax(-1, keepdim=True)
    e = (x - m).exp()
    s = e.view(r, 128, -1).sum(-1).sum(-1, keepdim=True)
    lse = m + s.log()
    ex = (e * x).view(r, 128, -1).sum(-1).sum(-1, keepdim=True) / s
    return torch.cat([x.gather(1, ids) - lse, lse - ex, arbiter._top5(x) - lse], dim=-1)


def graphed(fn, x: torch.Tensor, ids: torch.Tensor):
    """fn(x, ids) captured in a CUDA graph -> a callable replaying it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(x, ids)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(x, ids)
    return graph.replay, out


x2, ids2 = torch.cat([tl[1:2], dl[1:2]]).float(), ids.cuda()
for name, fn in (("current", arbiter._row_stats), ("split", row_stats_split)):
    replay, out = graphed(fn, x2, ids2)
    res[f"row_stats_{name}_graph_device_ms"] = device_ms(replay)
    res[f"row_stats_{name}_graph_ms"] = timed(lambda r=replay, o=out: (r(), o.cpu()))
res["split_max_abs_diff"] = float((row_stats_split(x2, ids2) - arbiter._row_stats(x2, ids2))
                                  .abs().max())
feats = arbiter.mismatch_features(tl[1:2], dl[1:2], [3], [7], [41])
res["policy_ms"] = timed(lambda: rule.policy.draft_prob(feats, None, None))
target, draft = random_model("1.5b"), random_model("0.5b")
prompt = torch.randint(1000, 100000, (128,), generator=torch.Generator().manual_seed(0)).tolist()
PIECES = ("ids", "queue", "wait_copy", "combine", "policy")
spent = dict.fromkeys(PIECES, 0.0)  # seconds in each piece of a decision, in the loop


def keep_draft_timed(prop: Proposal, i: int, t: int) -> bool:
    """``ArbiterRule._keep_draft`` (no hidden states) with a clock between its pieces."""
    clock = [time.perf_counter()]
    bonus = i == len(prop.tokens)
    d = prop.lookahead if bonus else prop.tokens[i]
    d_logits = prop.lookahead_logits if bonus else prop.draft_logits[i:i + 1]
    pair = torch.from_numpy(np.tile(np.array([[t, d]]), (2, 1)))
    clock.append(time.perf_counter())
    out = arbiter.row_stats([prop.target_logits[i:i + 1], d_logits], pair)
    clock.append(time.perf_counter())
    row = out.cpu().numpy()
    clock.append(time.perf_counter())
    feats = torch.from_numpy(arbiter._combine(row, 1, np.array([prop.position + i], np.float32)))
    clock.append(time.perf_counter())
    keep = float(rule.policy.draft_prob(feats, None, None)[0]) >= rule.threshold
    clock.append(time.perf_counter())
    for name, a, b in zip(PIECES, clock, clock[1:]):
        spent[name] += b - a
    return keep


def in_loop() -> dict:
    for _ in range(2):  # the first run captures the graphs; the second is measured
        stats = DecodeStats()
        spent.update(dict.fromkeys(PIECES, 0.0))
        list(generate(target, draft, prompt, rule, k=5, max_new_tokens=args.tokens,
                      stats=stats))
    n = max(stats.arbiter_calls, 1)
    out = {"decisions": stats.arbiter_calls, "steps": stats.steps,
           "ms_per_decision": 1e3 * stats.arbiter_s / n,
           "share_of_decode": stats.arbiter_s / stats.decode_s,
           "tokens_per_s": stats.tokens_per_s}
    if any(spent.values()):
        out.update({f"of_which_{name}_ms": 1e3 * s / n for name, s in spent.items()})
    return out


res["in_loop_graphed_decision"] = in_loop()
rule.graphed = False
res["in_loop_host"] = in_loop()
rule._keep_draft = keep_draft_timed
res["in_loop_host_timed"] = in_loop()
print(json.dumps(res))
