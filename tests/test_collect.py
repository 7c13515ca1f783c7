"""Divergence collection: the re-roll control token and the branches rolled out at each point."""

import gzip
import json

import pytest
import torch
from scipy.stats import chisquare

from cospec.batched import control_tokens, lockstep
from cospec.cli import main
from cospec.methods import encode_prompt
from cospec.tasks import get_task


def test_control_is_the_targets_second_choice_unless_that_is_the_drafts():
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0], [5.0, 4.0, 3.0, 0.0]])
    t, d = torch.tensor([0, 0]), torch.tensor([2, 1])
    c, sampled = control_tokens(logits, t, d)
    assert c[0] == 1 and not sampled[0]          # second choice, not the draft's
    assert c[1] in (2, 3) and sampled[1]         # the draft's token is the second choice


def test_sampled_control_follows_the_target_without_its_and_the_drafts_token():
    """Where the draft's token is the target's second choice the control is drawn from the
    target's distribution renormalised over the other tokens (chi-square, fixed seed)."""
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    n = 20000
    logits = probs.log().expand(n, -1).clone()
    t, d = torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)
    c, sampled = control_tokens(logits, t, d, torch.Generator().manual_seed(0))
    assert bool(sampled.all())
    counts = torch.bincount(c, minlength=5)
    assert counts[0] == counts[1] == 0
    expected = probs[2:] / probs[2:].sum() * n
    assert chisquare(counts[2:].numpy(), expected.numpy()).pvalue > 1e-3


def test_mbpp_splits_are_disjoint_and_cover_the_test_set():
    task = get_task("mbpp")
    dev, held = task.problems("dev"), task.problems("heldout")
    ids = {p.id for p in task.problems("test")}
    assert {p.id for p in dev} | {p.id for p in held} == ids and len(ids) == 500
    assert not {p.id for p in dev} & {p.id for p in held}
    assert 200 < len(dev) < 300


@pytest.mark.parametrize("task", ["gsm8k", "mbpp"])
def test_branches_are_the_target_path_with_one_token_flipped(tiny_dirs, tmp_path, task):
    """Each point's draft / control branch is the target's path up to the point, the draft's /
    control token there, then the target's greedy continuation (checked against plain greedy
    decoding of that prefix)."""
    t, d = tiny_dirs
    out = tmp_path / "div"
    assert main(["collect", "--target", str(t), "--draft", str(d), "--task", task, "--split",
                 "dev", "--limit", "2", "--max-new-tokens", "10", "--max-points", "2",
                 "--out", str(out)]) == 0
    assert json.loads((out / "meta.json").read_text())["branches"] == ["draft", "control"]
    with gzip.open(next(out.glob("shard-*.jsonl.gz")), "rt") as fh:
        recs = [json.loads(x) for x in fh][1:]
    paths = {r["id"]: r["target_ids"] for r in recs if "position" not in r}
    points = [r for r in recs if "position" in r]
    assert points and len(paths) == 2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, target = AutoTokenizer.from_pretrained(t), AutoModelForCausalLM.from_pretrained(t)
    probs = {p.id: p for p in get_task(task).problems("dev")}
    for r in recs:  # the path's log-probability: one unbatched forward over prompt + path
        if "position" not in r:
            prompt = encode_prompt(tok, probs[r["id"]].prompt)
            with torch.no_grad():
                logits = target(torch.tensor([prompt + r["target_ids"]])).logits[0]
            logp = logits[len(prompt) - 1:-1].float().log_softmax(-1)
            ref = logp.gather(1, torch.tensor(r["target_ids"])[:, None]).sum()
            assert r["target_logprob"] == pytest.approx(float(ref), abs=1e-3)
    for p in points:
        path, pos = paths[p["id"]], p["position"]
        assert p["t"] == path[pos] and len({p["t"], p["d"], p["c"]}) == 3
        for key, flip in (("draft_tail", p["d"]), ("control_tail", p["c"])):
            assert p[key][0] == flip
            prefix = encode_prompt(tok, probs[p["id"]].prompt) + path[:pos] + [flip]
            ref = lockstep(target, None, [prefix], max_new_tokens=10 - pos - 1,
                           eos_ids=[tok.eos_token_id], pad_id=0)[0].tokens
            assert p[key][1:] == ref


def test_recorded_logprob_is_the_targets_over_the_rows_own_tokens(target, draft):
    """A recording run sums the target's log-probabilities of each row's tokens, up to and
    including its EOS (not the steps a finished row idles through in the batch)."""
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    eos = lockstep(target, None, prompts, max_new_tokens=8, eos_ids=[], pad_id=0)[0].tokens[2]
    res = lockstep(target, draft, prompts, max_new_tokens=8, eos_ids=[eos], pad_id=0,
                   record=True)
    assert len(res[0].tokens) <= 3
    for p, r in zip(prompts, res):
        with torch.no_grad():
            logits = target(torch.tensor([p + r.tokens])).logits[0, len(p) - 1:-1]
        ref = logits.log_softmax(-1).gather(1, torch.tensor(r.tokens)[:, None]).sum()
        assert r.logprob == pytest.approx(float(ref), abs=1e-6)
