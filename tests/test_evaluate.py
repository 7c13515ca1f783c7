"""cospec eval scores every method with its own tokens (nothing copied from another method)."""

import json
from types import SimpleNamespace

import pytest
import torch

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
    summary = json.loads((out / "summary.json").read_text())["methods"]
    assert {by[(pid, "target")]["path"] for pid in ids} == {"batched"}  # b1 not reused
    assert summary["target"]["batched_agreement"] == 1.0  # so this compares two decoders
    assert summary["spd"]["batched_agreement"] is None  # its record is the b1 one itself


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


def on_a_gpu(monkeypatch):
    """eval's choice of the batch engine as on a GPU (the engine itself runs eagerly on the
    CPU); returns the methods it chose."""
    from cospec import evaluate

    real, chosen = evaluate.uses_batch_engine, set()

    def uses(s, method):
        picked = real(SimpleNamespace(device=torch.device("cuda"), built=s.built, args=s.args),
                      method)
        if picked:
            chosen.add(method)
        return picked

    monkeypatch.setattr(evaluate, "uses_batch_engine", uses)
    return chosen


def records(out) -> dict:
    recs = [json.loads(x) for x in (out / "accuracy.jsonl").read_text().splitlines()]
    return {(r["id"], r["method"]): r for r in recs}


def test_cos_through_the_batch_engine_greedy(tiny_dirs, tmp_path, monkeypatch):
    """On a GPU eval decodes cos-we and cd-sd with the batch engine (we and cd, which it
    cannot run, with the lockstep decoder): at T = 0 in fp32 their tokens are greedy WE's
    and CD's, for every problem."""
    chosen = on_a_gpu(monkeypatch)
    t, d = tiny_dirs
    out = tmp_path / "run"
    assert main(["eval", "--target", str(t), "--draft", str(d), "--task", "gsm8k", "--split",
                 "dev", "--limit", "5", "--max-new-tokens", "12", "--k", "3",
                 "--methods", "target,we,cd,cos-we,cd-sd", "--speed-subset", "0",
                 "--batch-size", "3", "--out", str(out)]) == 0
    assert chosen == {"cos-we", "cd-sd"}
    by = records(out)
    ids = sorted({pid for pid, _ in by})
    assert len(ids) == 5 and len(by) == 25
    for pid in ids:
        for method, same in (("cos-we", "we"), ("cd-sd", "cd")):
            assert by[(pid, method)]["path"] == "batch-engine"
            assert by[(pid, same)]["path"] == "batched"
            assert by[(pid, method)]["token_ids"] == by[(pid, same)]["token_ids"]
    assert any(by[(p, "we")]["token_ids"] != by[(p, "target")]["token_ids"] for p in ids)


def test_cos_through_the_batch_engine_sampled(tiny_dirs, tmp_path, monkeypatch):
    """At T > 0 the records are the engine's draws for each method's own combination
    (cos-we: alternate proposal; cd-sd: lookahead), problem i seeded with seed + i: the same
    tokens as an engine built here from the method's definition."""
    from cospec import fast_batch
    from cospec.cos import Combination

    on_a_gpu(monkeypatch)
    calls, real = [], fast_batch.generate_batch

    def spy(target, draft, prompts, **kw):
        calls.append((target, draft, prompts, kw))
        return real(target, draft, prompts, **kw)

    monkeypatch.setattr(fast_batch, "generate_batch", spy)
    t, d = tiny_dirs
    out = tmp_path / "run"
    assert main(["eval", "--target", str(t), "--draft", str(d), "--task", "gsm8k", "--split",
                 "dev", "--limit", "5", "--max-new-tokens", "10", "--k", "2",
                 "--temperature", "1", "--seed", "7", "--methods", "target,cos-we,cd-sd",
                 "--speed-subset", "0", "--batch-size", "2", "--out", str(out)]) == 0
    by = records(out)
    ids = sorted({pid for pid, _ in by})
    assert len(calls) == 2 and len(ids) == 5
    expect = {"cos-we": dict(combo=Combination("we", (0.5, 0.5)), alternate=True),
              "cd-sd": dict(combo=Combination("cd", mu=0.1), alternate=False)}
    for (target, draft, prompts, kw), method in zip(calls, ("cos-we", "cd-sd")):
        assert kw["seeds"] == [7 + i for i in range(5)]
        want = real(target, draft, prompts, max_new_tokens=10, sampling=kw["sampling"],
                    seeds=kw["seeds"], rows=2, k=2, eos_ids=kw["eos_ids"], **expect[method])
        mine = [r for r in by.values() if r["method"] == method]  # in problem order
        assert [r["token_ids"] for r in mine] == want
        assert all(r["path"] == "batch-engine" for r in mine)
    assert by[(ids[0], "cos-we")]["token_ids"] != by[(ids[0], "cd-sd")]["token_ids"]


@pytest.mark.parametrize("graphs", [False, True])
def test_speed_warm_up_runs_the_longest_problem_through_every_shape(tiny_dirs, tmp_path,
                                                                   monkeypatch, graphs):
    """Before the timed problems each method decodes the longest of them with budgets 8 and
    1..k + 1 (every verify shape); where the fast path captures CUDA graphs (stood in: the
    static engines on the CPU) first at the full budget, so the caches the timed problems
    need exist before the clock runs."""
    from cospec.eval_setup import EvalSetup

    if graphs:
        monkeypatch.setenv("COSPEC_STATIC", "1")
    calls = []
    real_run_one = EvalSetup.run_one
    monkeypatch.setattr(EvalSetup, "run_one", lambda self, m, i, max_new_tokens=None: (
        calls.append((m, len(self.prompts[i]), max_new_tokens))
        or real_run_one(self, m, i, max_new_tokens)))
    t, d = tiny_dirs
    assert main(["eval", "--target", str(t), "--draft", str(d), "--task", "gsm8k", "--split",
                 "dev", "--limit", "3", "--max-new-tokens", "6", "--methods", "target,spd",
                 "--k", "2", "--speed-subset", "3", "--out", str(tmp_path / "run")]) == 0
    longest = max(n for _, n, _ in calls)
    budgets = [*([None] if graphs else []), 8, 1, 2, 3]
    warm = [(m, longest, b) for m in ("target", "spd") for b in budgets]
    assert calls[:len(warm)] == warm
    assert [b for _, _, b in calls[len(warm):]] == [None] * 6  # the timed problems


def test_an_int8_draft_is_one_draft_in_both_passes(tiny_dirs, tmp_path):
    """eval --draft-weights int8 on a CPU: the batched accuracy pass (ten problems a
    batch) gives the draft alone and a lossy rule keeping draft tokens the very tokens the
    batch-1 speed pass gave them (batched = b1 on every problem, each decoded batched),
    tokens that are not the float draft's; the folder's config names the int8 draft."""
    t, d = tiny_dirs
    runs = {}
    for weights in ("int8", "model"):
        out = tmp_path / weights
        assert main(["eval", "--target", str(t), "--draft", str(d), "--task", "gsm8k",
                     "--split", "dev", "--limit", "10", "--max-new-tokens", "24",
                     "--methods", "target,draft,confidence", "--threshold", "0.2",
                     "--batch-size", "10", "--speed-subset", "10", "--draft-weights", weights,
                     "--device", "cpu", "--out", str(out)]) == 0
        summary = json.loads((out / "summary.json").read_text())
        for method in ("draft", "confidence"):  # decoded batched, not copied from b1
            assert summary["methods"][method]["batched_agreement"] == 1.0
            assert {r["path"] for r in records(out).values() if r["method"] == method} == {
                "batched"}
        runs[weights] = [json.loads(x)["token_ids"]
                         for x in (out / "speed.jsonl").read_text().splitlines()
                         if json.loads(x)["method"] == "draft"]
    assert runs["int8"] != runs["model"]
    assert json.loads((tmp_path / "int8" / "config.json").read_text())["draft_weights"] == "int8"


def test_an_int8_draft_on_a_gpu_keeps_eval_to_batch1_methods(monkeypatch):
    """On a GPU only the batch-1 engines read an int8 draft's copies: eval refuses, before
    any model loads, the methods its batched decoder runs with the draft, and keeps
    target, the peer and the exact speculative methods (decoded at batch 1 there)."""
    from argparse import Namespace

    from cospec import models
    from cospec.errors import CospecError
    from cospec.evaluate import check_draft_weights, uses_batch_engine

    monkeypatch.setattr(models, "check_device", lambda device: device)
    args = Namespace(command="eval", device="cuda", draft_weights="int8")
    check_draft_weights(args, ["target", "spd", "cos-we", "hf-assisted"])
    for method in ("draft", "cospec", "we"):
        with pytest.raises(CospecError, match=f"decode {method} with the draft's own"):
            check_draft_weights(args, ["target", method])
    check_draft_weights(Namespace(command="eval", device="cpu", draft_weights="int8"),
                        ["draft", "cospec"])
    check_draft_weights(Namespace(command="bench", device="cuda", draft_weights="int8"),
                        ["draft"])
    s = SimpleNamespace(args=args, device=torch.device("cuda"), built={"spd": None})
    assert not uses_batch_engine(s, "spd")


def test_a_resumed_run_keeps_every_chunk_of_its_batched_throughput(tiny_dirs, tmp_path):
    """A run extended to more problems decodes the new ones in chunks of their own: the
    batched tokens/s is over every chunk's tokens and seconds, none overwritten by a later
    chunk that starts at the same place in its own list."""
    t, d = tiny_dirs
    out = tmp_path / "run"
    for limit in ("2", "4"):
        assert main(["eval", "--target", str(t), "--draft", str(d), "--task", "gsm8k",
                     "--split", "dev", "--limit", limit, "--max-new-tokens", "4",
                     "--methods", "target", "--speed-subset", "0", "--batch-size", "1",
                     "--out", str(out)]) == 0
    chunks = [json.loads(x) for x in (out / "throughput.jsonl").read_text().splitlines()]
    assert len(chunks) == 2 and len({c["id"] for c in chunks}) == 2
    assert sum(c["sequences"] for c in chunks) == 4
    summary = json.loads((out / "summary.json").read_text())["methods"]["target"]
    assert summary["batched_tokens_per_s"] == pytest.approx(
        sum(c["tokens"] for c in chunks) / sum(c["seconds"] for c in chunks))


def test_warm_up_goes_again_after_a_capture_and_a_capture_in_timing_is_flagged(
        tiny_dirs, tmp_path, monkeypatch):
    """Where graphs are captured (stood in: the static engines on the CPU and a counter in
    place of ``fast_block.captures``), a warm-up round that captured (a later method's
    larger cache replacing an earlier one's engine) is followed by another, until one
    captures nothing; a timed run that still captured is flagged in its record, the summary
    and the report."""
    from cospec import fast_block
    from cospec.eval_setup import EvalSetup

    monkeypatch.setenv("COSPEC_STATIC", "1")
    calls, captured = [], [0]
    real_run_one = EvalSetup.run_one

    def run_one(self, m, i, max_new_tokens=None):
        calls.append(m)
        out = real_run_one(self, m, i, max_new_tokens)
        if len(calls) in (6, 22):  # spd's first warm-up; the second timed run
            captured[0] += 1
        return out

    monkeypatch.setattr(EvalSetup, "run_one", run_one)
    monkeypatch.setattr(fast_block, "captures", lambda: (captured[0], 0.0))
    t, d = tiny_dirs
    out = tmp_path / "run"
    assert main(["eval", "--target", str(t), "--draft", str(d), "--task", "gsm8k", "--split",
                 "dev", "--limit", "3", "--max-new-tokens", "6", "--methods", "target,spd",
                 "--k", "2", "--speed-subset", "3", "--out", str(out)]) == 0
    assert len(calls) == 2 * 10 + 6  # two warm-up rounds of 2 methods x 5 budgets, 6 timed
    recs = [json.loads(x) for x in (out / "speed.jsonl").read_text().splitlines()]
    flagged = [f"{r['method']} on {r['id']}" for r in recs if r["captured"]]
    assert len(flagged) == 1 and calls[21] in flagged[0]
    assert json.loads((out / "summary.json").read_text())["captured_in_timing"] == flagged
    assert "Warning: 1 timed run(s) captured a CUDA graph" in (out / "report.md").read_text()
