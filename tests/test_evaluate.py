"""cospec eval scores every method with its own tokens (nothing copied from another method)."""

import json

from cospec.cli import main
from cospec.methods import Method


def test_exact_methods_are_scored_with_their_own_tokens(tiny_dirs, tmp_path, monkeypatch):
    """spd's accuracy records hold spd's own tokens, not the target's: a run whose spd
    tokens differ from the target's (as bf16 rounding can make them) must show it."""
    real_run = Method.run

    def run(self, prompt_ids, **kw):
        ids, flags, stats = real_run(self, prompt_ids, **kw)
        if self.name == "spd":  # stand-in for a bf16 rounding difference
            ids, flags = ids[:-1] + [(ids[-1] + 1) % 50], flags
        return ids, flags, stats

    monkeypatch.setattr(Method, "run", run)
    t, d = tiny_dirs
    out = tmp_path / "run"
    assert main(["eval", "--target", str(t), "--draft", str(d), "--task", "gsm8k", "--split",
                 "dev", "--limit", "3", "--max-new-tokens", "6", "--methods", "target,spd",
                 "--speed-subset", "1", "--out", str(out)]) == 0
    recs = [json.loads(x) for x in (out / "accuracy.jsonl").read_text().splitlines()]
    by = {(r["id"], r["method"]): r for r in recs}
    ids = sorted({r["id"] for r in recs})
    assert len(ids) == 3 and len(recs) == 6
    for pid in ids:
        spd, target = by[(pid, "spd")], by[(pid, "target")]
        assert "via" not in spd and spd["path"] == "batch1"
        assert spd["token_ids"][:-1] == target["token_ids"][:-1]
        assert spd["token_ids"][-1] != target["token_ids"][-1]
    speed = {json.loads(x)["id"] for x in (out / "speed.jsonl").read_text().splitlines()}
    assert len(speed) == 1  # the speed subset's spd tokens were reused, not decoded again


def test_spd_through_the_batch_engine_is_scored_with_its_own_tokens(tiny_dirs, tmp_path,
                                                                     monkeypatch):
    """Where eval decodes spd with the batch engine (on a GPU; forced here on the CPU), the
    records hold the engine's tokens, which at T = 0 in fp32 are the target's greedy ones,
    for every problem, and no problem is decoded at batch 1."""
    from cospec import evaluate
    from cospec.fast_batch import BatchEngine

    monkeypatch.setattr(evaluate, "uses_batch_engine", lambda s, m: m == "spd")
    steps = []
    real_step = BatchEngine.step
    monkeypatch.setattr(BatchEngine, "step", lambda self: steps.append(1) or real_step(self))
    monkeypatch.setattr(Method, "run", lambda *a, **kw: (_ for _ in ()).throw(
        AssertionError("spd decoded at batch 1")))
    t, d = tiny_dirs
    out = tmp_path / "run"
    assert main(["eval", "--target", str(t), "--draft", str(d), "--task", "gsm8k", "--split",
                 "dev", "--limit", "5", "--max-new-tokens", "12", "--methods", "target,spd",
                 "--speed-subset", "0", "--batch-size", "3", "--out", str(out)]) == 0
    recs = [json.loads(x) for x in (out / "accuracy.jsonl").read_text().splitlines()]
    by = {(r["id"], r["method"]): r for r in recs}
    ids = sorted({r["id"] for r in recs})
    assert len(ids) == 5 and len(recs) == 10 and steps
    for pid in ids:
        spd, target = by[(pid, "spd")], by[(pid, "target")]
        assert spd["path"] == "batch-engine"
        assert spd["token_ids"] == target["token_ids"]
