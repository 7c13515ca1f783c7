"""Continuous batching in ``cospec serve`` (``cospec.batch_scheduler``) on tiny models.

Requests of target, spd and cospec decode together in batch engines; each must get exactly
the tokens the library's batch-1 loop gives it alone at T = 0, whatever else shares its
steps (several sub-batches, requests joining mid-flight, streams and plain responses, EOS
and ``ignore_eos`` rows side by side). A client that goes away frees its slot before the
next step; a request that cannot fit a slot is a 400 naming ``--max-context``.
"""

import copy
import dataclasses
import threading
import time

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from test_server import MODEL, TEMPLATE, chat, health, near_copy  # noqa: E402
from tiny import tiny_model, tiny_tokenizer  # noqa: E402

from cospec import fast_block  # noqa: E402
from cospec.arbiter import FEATURES, LearnedPolicy, save_arbiter  # noqa: E402
from cospec.methods import MethodOptions, build_method, chat_ids, eos_ids  # noqa: E402
from cospec.models import Pair  # noqa: E402
from cospec.sampling import GREEDY, SamplingConfig  # noqa: E402
from cospec.server import BackgroundServer, create_app  # noqa: E402

EXTRA_EOS = 29  # a token in most of the target's greedy answers to these tests' prompts


@pytest.fixture(scope="module")
def pair():
    """The server tests' pair with a second EOS id, so that some rows end at EOS while
    others run on (the test checks that both happen)."""
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    target = tiny_model(1, vocab=len(tok))
    target.generation_config.eos_token_id = [tok.eos_token_id, EXTRA_EOS]
    return Pair(target, near_copy(target, 0.05), tok, MODEL, "tiny-draft")


@pytest.fixture(scope="module")
def arbiter(tmp_path_factory):
    path = tmp_path_factory.mktemp("arbiter") / "arbiter.safetensors"
    save_arbiter(LearnedPolicy(len(FEATURES), None, 8), path, (MODEL, "tiny-draft"))
    return str(path)


def alone(pair, arbiter, method, prompt, k, max_tokens, ignore_eos=False):
    """(text, completion tokens, finish reason) of the library's batch-1 loop at T = 0."""
    tok = pair.tokenizer
    ids = chat_ids(tok, [{"role": "user", "content": prompt}])
    eos = [] if ignore_eos else eos_ids(tok, pair.target)
    out = build_method(method, pair, MethodOptions(arbiter=arbiter)).run(
        ids, k=k, max_new_tokens=max_tokens, sampling=GREEDY, eos_ids=eos)[0]
    finish = "stop" if out and out[-1] in eos else "length"
    return tok.decode(out, skip_special_tokens=True), len(out), finish


def serve(pair, arbiter=None, **kw):
    """A background server of ``pair``; spd keeps its draft under any load unless
    ``spec_off_at`` is given."""
    kw = {"methods": ["target", "spd", "cospec", "cos-we"] if arbiter else ["target", "spd"],
          "arbiter": arbiter, "max_active": 2, "max_queue": 32, "timeout": 60,
          "spec_off_at": 0, **kw}
    return BackgroundServer(create_app(pair, **kw))


def ask(client, req: dict) -> tuple[str, int, str, dict]:
    """(text, completion tokens, finish reason, metrics) of one request, streamed or not."""
    kw = {k: req[k] for k in ("method", "k", "max_tokens", "ignore_eos") if k in req}
    if not req.get("stream"):
        r = chat(client, req["prompt"], **kw)
        return (r.choices[0].message.content, r.usage.completion_tokens,
                r.choices[0].finish_reason, r.model_extra["metrics"])
    chunks = list(chat(client, req["prompt"], stream=True,
                       stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    final = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    return (text, chunks[-1].usage.completion_tokens, final.choices[0].finish_reason,
            final.model_extra["metrics"])


def concurrently(fn, items) -> list:
    """fn(item) for every item, each on its own thread at once; results in order."""
    out, errors = [None] * len(items), []

    def run(i, item):
        try:
            out[i] = fn(item)
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i, x), daemon=True)
               for i, x in enumerate(items)]
    for t in threads:
        t.start()
    end = time.monotonic() + 120
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), "requests still unanswered after 120 s"
    return out


REQUESTS = [  # method, k, max_tokens, ignore_eos, stream
    ("spd", 3, 24, False, False), ("spd", 3, 40, True, True), ("target", None, 17, False, True),
    ("spd", 2, 30, True, False), ("cospec", 3, 24, False, True), ("target", None, 33, True, False),
    ("spd", 3, 9, True, True), ("cospec", 3, 28, True, False), ("spd", 3, 36, False, False),
    ("target", None, 21, True, False), ("spd", 2, 12, False, True), ("spd", 3, 27, True, False),
]


@pytest.mark.parametrize("max_batch", [3, 16])
def test_concurrent_requests_equal_each_alone(pair, arbiter, max_batch):
    """Twelve requests at once over four sub-batches (target, spd k=3, spd k=2, cospec): with
    16 slots they share engines, with 3 they also queue for slots and engines. Each gets the
    batch-1 loop's tokens for its own prompt; its metrics are its own rows'."""
    reqs = [{"prompt": f"request {i}: hello world {'the answer ' * (i % 4)}{i}",
             "method": m, "max_tokens": n, "ignore_eos": ie, "stream": st,
             **({"k": k} if k else {})}
            for i, (m, k, n, ie, st) in enumerate(REQUESTS)]
    want = [alone(pair, arbiter, r["method"], r["prompt"], r.get("k", 4), r["max_tokens"],
                  r["ignore_eos"]) for r in reqs]
    assert len({w[0] for w in want}) == len(want)       # every answer differs
    assert {w[2] for w in want} == {"stop", "length"}    # some end at EOS, some at the budget
    with serve(pair, arbiter, max_batch=max_batch) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0,
                               timeout=60)
        got = concurrently(lambda r: ask(client, r), reqs)
        h = health(srv)
    assert [g[:3] for g in got] == want
    for r, (_, n, _, m) in zip(reqs, got):
        assert m["method"] == r["method"] and m["steps"] >= 1 and m["decode_s"] > 0
        assert m["prefill_s"] > 0 and m["queue_s"] >= 0 and m["tokens_per_s"] > 0
        if r["method"] == "target":
            assert m["steps"] == n and m["drafted"] == 0 and m["tau"] == 1
        else:
            assert m["drafted"] == r["k"] * m["steps"] and m["accepted"] <= m["drafted"]
            assert m["steps"] < n  # drafts were kept: fewer target passes than tokens
        if r["method"] == "spd":
            assert m["from_draft"] <= m["accepted"] and m["arbiter_calls"] == 0
    assert any(m["arbiter_calls"] for r, (*_, m) in zip(reqs, got) if r["method"] == "cospec")
    assert h["errors"] == 0 and h["completed"] == len(reqs) and h["active"] == 0
    assert 0 < h["engine_step_s"] <= h["batch_worker_s"]  # the steps within the worker's turns
    assert h["engine_step_s"] >= sum(m["decode_s"] for *_, m in got) / len(reqs)


@pytest.mark.parametrize("method", ["spd", "lookup"])
def test_spd_runs_target_only_under_load(pair, method):
    """spec_off_at = 1: every spd (or prompt lookup) request is planned target-only. Each
    still gets its method's batch-1 tokens (greedy: the target's); its metrics say so (no
    proposals, a target pass a token) and only the target-only engine holds slots."""
    reqs = [{"prompt": f"load {i}: hello world {i}", "method": method, "k": 3,
             "max_tokens": 12 + 4 * i, "stream": i % 2 == 1} for i in range(3)]
    want = [alone(pair, None, method, r["prompt"], 3, r["max_tokens"]) for r in reqs]
    assert want == [alone(pair, None, "target", r["prompt"], 3, r["max_tokens"])
                    for r in reqs]
    with serve(pair, max_batch=4, spec_off_at=1, methods=["target", method]) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0,
                               timeout=60)
        got = concurrently(lambda r: ask(client, r), reqs)
        h = health(srv)
    assert [g[:3] for g in got] == want
    for _, n, _, m in got:
        assert m["method"] == method and m["speculation_off"]
        assert m["drafted"] == 0 and m["steps"] == n
    assert h["batch_slots_in_use"] == {"target": 0} and h["errors"] == 0
    assert h["spec_off_at"] == 1 and h["speculation_off"] == len(reqs)


def test_speculation_off_from_the_nth_request(pair, arbiter):
    """``BatchPool.plan`` with spec_off_at = 3: the first two spd requests keep their draft,
    the third (three decoding at once) is planned target-only; cospec keeps its draft under
    any load; an spd request whose prompt and budget fit an spd slot but not a target-only
    one (its larger run-ahead) keeps its draft, and so does a sampled one with a seed (not an
    unseeded or a greedy one), such requests sharing one spd engine of every slot (not one of
    spec_off_at - 1); spec_off_at = 0 never turns it off."""
    from cospec.batch_scheduler import BatchPool, reserve
    from cospec.job import Job

    opts = MethodOptions(arbiter=arbiter)
    spd, target, cospec = (build_method(m, pair, opts) for m in ("spd", "target", "cospec"))

    def job(method, prompt=4, max_tokens=8):
        return Job(method, list(range(1, prompt + 1)), max_tokens, 2, GREEDY, None, (), (),
                   deadline=time.monotonic() + 60)

    pool = BatchPool(8, 64, spec_off_at=3, target=target)
    jobs = [job(spd) for _ in range(3)]
    assert all(pool.plan(j, ("spd", 2)) for j in jobs)
    assert [j.speculation_off for j in jobs] == [False, False, True]
    assert [(g.key, g.method.name, len(g.jobs)) for g in pool.groups] == [
        (("spd", 2), "spd", 2), (("target", 0), "target", 1)]
    def busy() -> BatchPool:  # every request "under load"
        return BatchPool(8, 64, spec_off_at=1, target=target)

    late, other = job(cospec), busy()
    assert other.plan(late, ("cospec", 2)) and not late.speculation_off
    room = 64 - reserve(spd, 2)  # prompt + max_tokens an spd slot takes, a target one not
    assert room + reserve(target, 0) > 64
    long, other = job(spd, prompt=room - 8), busy()
    assert other.plan(long, ("spd", 2)) and not long.speculation_off
    short, other = job(spd, prompt=room - 8 - reserve(target, 0) + reserve(spd, 2)), busy()
    assert other.plan(short, ("spd", 2)) and short.speculation_off
    sampled = SamplingConfig(temperature=0.8)
    for seed, off in ((7, False), (None, True)):
        drawn, other = dataclasses.replace(job(spd), sampling=sampled, seed=seed), busy()
        assert other.plan(drawn, ("spd", 2)) and drawn.speculation_off == off
    seeded, other = dataclasses.replace(job(spd), seed=7), busy()  # greedy: the same tokens
    assert other.plan(seeded, ("spd", 2)) and seeded.speculation_off
    kept = BatchPool(8, 64, spec_off_at=3, target=target)  # requests that keep their draft
    drawn = [dataclasses.replace(job(spd), sampling=sampled, seed=i) for i in range(4)]
    assert all(kept.plan(j, ("spd", 2)) for j in drawn)  # share one engine of every slot
    assert [(g.key, g.size, len(g.jobs)) for g in kept.groups] == [(("spd", 2), 8, 4)]
    never = BatchPool(8, 64, spec_off_at=0, target=target)
    assert all(never.plan(job(spd), ("spd", 2)) for _ in range(4))
    assert [g.key for g in never.groups] == [("spd", 2)]


@pytest.mark.parametrize("method", ["spd", "lookup"])
def test_running_spd_requests_go_target_only_under_load(pair, arbiter, method):
    """Under load the spd (or prompt lookup) requests already decoding in their engine move
    to the target-only engine (``BatchPool._switch_running``) and go on from the tokens
    they committed: two such requests decode a few blocks, two more arrive (speculation off
    from 3 live) and are planned target-only, and at the next turn the first two leave
    their engine too, their prefill in the target-only engine counted as prefill. Every
    request gets target-only greedy decoding's tokens for its prompt alone."""
    from cospec.batch_scheduler import BatchPool
    from cospec.job import Job

    opts = MethodOptions(arbiter=arbiter)
    spd, target = (build_method(m, pair, opts) for m in (method, "target"))
    prompts = [[5 + i, 17, 9 + 2 * i, 30 - i] for i in range(4)]
    jobs = [Job(spd, p, 20, 2, GREEDY, None, (), (), deadline=time.monotonic() + 60)
            for p in prompts]
    want = [target.run(p, k=2, max_new_tokens=20, sampling=GREEDY, eos_ids=[])[0]
            for p in prompts]
    pool = BatchPool(8, 64, spec_off_at=3, target=target)
    got = {j: [] for j in jobs}

    def turn():
        for j, c in pool.turn():
            got[j] += c.tokens

    assert pool.plan(jobs[0], (method, 2)) and pool.plan(jobs[1], (method, 2))
    for _ in range(3):
        turn()
    spd_group = pool.groups[0]
    assert spd_group.key == (method, 2) and set(spd_group.jobs) == set(jobs[:2])
    assert all(0 < len(got[j]) < 20 for j in jobs[:2])
    assert pool.plan(jobs[2], (method, 2)) and pool.plan(jobs[3], (method, 2))
    assert [j.speculation_off for j in jobs] == [False, False, True, True]
    prefilled = [j.stats.prefill_s for j in jobs[:2]]
    turn()
    assert not spd_group.jobs and not spd_group.engine.busy
    # the move's prefill counts as prefill, not decode
    assert all(j.stats.prefill_s > p > 0 for j, p in zip(jobs[:2], prefilled))
    assert all(j.speculation_off for j in jobs) and pool.switched == 4
    while pool.busy:
        turn()
    assert [got[j] for j in jobs] == want
    assert len({tuple(w) for w in want}) == len(want)  # every answer differs


def test_load_holds_after_the_requests_that_made_it_end(pair, arbiter):
    """Once spec_off_at requests were live, an spd request planned within ``spec_off_hold``
    seconds (the pool's clock) runs target-only though fewer decode now (the next requests
    of clients whose requests ended together), and keeps its draft after it; with no hold
    it keeps its draft at once."""
    from cospec.batch_scheduler import BatchPool
    from cospec.job import Job

    spd, target = (build_method(m, pair, MethodOptions(arbiter=arbiter))
                   for m in ("spd", "target"))
    now = [100.0]

    def job():
        return Job(spd, [3, 4, 5], 8, 2, GREEDY, None, (), (), deadline=time.monotonic() + 60)

    def offs(pool, at):  # a request planned at ``at`` alone after three ended: target-only?
        now[0] = 100.0
        first = [job() for _ in range(3)]
        assert all(pool.plan(j, ("spd", 2)) for j in first)
        assert [j.speculation_off for j in first] == [False, False, True]
        for j in first:
            j.finish = "stop"
        now[0] = at
        late = job()
        assert pool.plan(late, ("spd", 2)) and pool.live() == 1
        return late.speculation_off

    def pool(hold):
        return BatchPool(8, 64, spec_off_at=3, target=target, spec_off_hold=hold,
                         clock=lambda: now[0])

    assert offs(pool(1.0), 100.5) and not offs(pool(1.0), 101.5)
    assert not offs(pool(0.0), 100.0)


def test_target_only_engine_takes_every_slot_under_load(pair, arbiter):
    """While speculation can go off, spd's engine has spec_off_at - 1 rows beside the slots
    and the target-only engine gets all max_batch of them, even with more spd requests
    queued (they will go target-only too: two target-only engines would each be stepped
    every turn); never more than max_batch requests live; under load an spd request that
    finds no target-only row waits rather than speculate."""
    from cospec.batch_scheduler import BatchPool
    from cospec.job import Job

    opts = MethodOptions(arbiter=arbiter)
    spd, target = (build_method(m, pair, opts) for m in ("spd", "target"))
    jobs = [Job(spd, [3, 4, 5 + i], 40, 2, GREEDY, None, (), (), deadline=time.monotonic() + 60)
            for i in range(6)]
    pool = BatchPool(4, 64, spec_off_at=3, target=target)
    key = ("spd", 2)
    assert pool.plan(jobs[0], key, {key}) and pool.plan(jobs[1], key, {key})
    assert all(pool.plan(j, key, {key}) for j in jobs[2:4])
    assert [(g.key, g.size, g.extra, len(g.jobs)) for g in pool.groups] == [
        (key, 2, True, 2), (("target", 0), 4, False, 2)]
    assert not pool.plan(jobs[4], key, {key})  # 4 live: max_batch
    pool.turn()                                # the first two go target-only
    assert [len(g.jobs) for g in pool.groups] == [0, 4] and not pool.plan(jobs[4], key)
    shared = BatchPool(4, 64, spec_off_at=2, target=target)  # cospec holds half the slots
    cospec = Job(build_method("cospec", pair, opts), [3, 4], 40, 2, GREEDY, None, (), (),
                 deadline=time.monotonic() + 60)
    assert shared.plan(cospec, ("cospec", 2), {("cospec", 2), key})
    assert shared.plan(jobs[4], key) and shared.plan(jobs[5], key)  # target-only, 2 rows
    assert not shared.plan(jobs[0], key)       # waits: no spd row under load
    assert [(g.key, g.size, len(g.jobs)) for g in shared.groups] == [
        (("cospec", 2), 2, 1), (("target", 0), 2, 2)]


def test_speculation_off_default(pair):
    """Without spec_off_at the server takes SPEC_OFF_AT, 4, on a CPU too (batched spd
    measured slower than target-only from 4 rows on, on an H200 and on a 2-core CPU); a
    given value, 0 included, is kept; a negative one is refused."""
    from cospec.batch_scheduler import SPEC_OFF_AT
    from cospec.errors import CospecError

    assert SPEC_OFF_AT == 4
    app = create_app(pair, methods=["target", "spd"], max_batch=4)
    assert app.state.engine.pool.spec_off_at == 4
    for given in (3, 0):
        app = create_app(pair, methods=["target", "spd"], max_batch=4, spec_off_at=given)
        assert app.state.engine.pool.spec_off_at == given
    with pytest.raises(CospecError, match="spec_off_at"):
        create_app(pair, methods=["target", "spd"], max_batch=4, spec_off_at=-1)


def test_an_int8_draft_beside_batch_engines_serves_the_targets_output_only(pair, arbiter):
    """A draft given int8 copies (``draft_weights(pair, "int8")``) is read by the batch-1
    engines only. Beside batch engines create_app serves the methods whose output is the
    target's whatever the draft (target, spd) and refuses any that batches with the draft
    otherwise (cospec, cos-we: they would decode with another draft under load), which
    max_batch 0 serves; its default methods leave cospec out there."""
    from cospec import fast
    from cospec.errors import CospecError

    draft = copy.deepcopy(pair.draft)
    fast.int8_weights(draft)  # what draft_weights does on a GPU (the CPU's copies alike)
    int8 = Pair(pair.target, draft, pair.tokenizer, MODEL, "tiny-draft")
    for methods in (["cospec"], ["target", "spd", "cos-we"]):
        with pytest.raises(CospecError, match="max-batch 0"):
            create_app(int8, methods=methods, arbiter=arbiter, max_batch=4)
    assert create_app(int8, methods=["target", "spd", "cospec"], arbiter=arbiter,
                      max_batch=0).state.engine.pool is None
    served = create_app(int8, methods=["target", "spd"], max_batch=4).state.engine
    assert served.pool is not None and list(served.methods) == ["target", "spd"]
    assert list(create_app(int8, arbiter=arbiter, max_batch=4).state.engine.methods) == [
        "target", "spd"]
    assert "cospec" in create_app(pair, arbiter=arbiter, max_batch=4).state.engine.methods
    more = Pair(pair.target, draft, pair.tokenizer, MODEL, "tiny-draft", extra=(pair.draft,))
    assert list(create_app(more, max_batch=4).state.engine.methods) == ["target"]


def test_requests_join_mid_flight(pair):
    """A long stream decodes; short requests sent while it runs join its engine, finish
    first, and neither they nor the long one change a token."""
    long = {"prompt": "a long one", "method": "spd", "k": 3, "max_tokens": 400,
            "ignore_eos": True}
    short = [{"prompt": f"short {i}", "method": "spd", "k": 3, "max_tokens": 8 + i}
             for i in range(3)]
    want_long = alone(pair, None, "spd", long["prompt"], 3, 400, True)
    want_short = [alone(pair, None, "spd", r["prompt"], 3, r["max_tokens"]) for r in short]
    with serve(pair, max_batch=4) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0,
                               timeout=60)
        stream = chat(client, long["prompt"], stream=True, method="spd", k=3, max_tokens=400,
                      ignore_eos=True)
        pieces = [next(stream).choices[0].delta.content or ""]  # the role chunk
        while not pieces[-1]:
            pieces.append(next(stream).choices[0].delta.content or "")  # decoding has begun
        got_short = concurrently(lambda r: ask(client, r), short)
        during = health(srv)
        pieces += [c.choices[0].delta.content or "" for c in stream if c.choices]
        after = health(srv)
    assert [g[:3] for g in got_short] == want_short
    assert "".join(pieces) == want_long[0]
    assert during["active"] == 1 and during["batch_slots_in_use"] == {"spd/k=3": 1}
    assert after["completed"] == 4 and after["errors"] == 0
    assert all(g[3]["queue_s"] < 1.0 for g in got_short)  # admitted at once, not after


@pytest.mark.parametrize("solo", [True, False])
def test_a_lone_request_decodes_alone_until_others_arrive(pair, arbiter, monkeypatch, solo):
    """With the fast path's engines (COSPEC_STATIC=1 on the CPU), a lone greedy spd (or
    cospec) request decodes on the batch-1 path (each block on the device), not in a batch
    engine; when short requests arrive it moves to the pool and goes on from its tokens.
    Every request gets the tokens it gets alone. A lone spd request decodes as spd-staged
    (its draft checks prompt-lookup guesses), a lone cospec one as itself. A lone
    target-only request and ``solo`` off keep to the pool."""
    monkeypatch.setenv("COSPEC_STATIC", "1")
    short = [{"prompt": f"short {i}", "method": "spd", "k": 3, "max_tokens": 8 + i}
             for i in range(3)]
    want = {m: alone(pair, arbiter, m, "a long one", 3, 400, True) for m in ("spd", "cospec")}
    want_short = [alone(pair, arbiter, "spd", r["prompt"], 3, r["max_tokens"]) for r in short]
    guessed = []  # the server's device-side generations' guesses a block
    plain = fast_block.stream
    monkeypatch.setattr(fast_block, "stream",
                        lambda *a, **kw: guessed.append(kw["guesses"]) or plain(*a, **kw))
    with serve(pair, arbiter, max_batch=4, solo=solo) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0,
                               timeout=60)
        got, before = {}, {}
        for method in ("spd", "cospec"):
            stream = chat(client, "a long one", stream=True, method=method, k=3,
                          max_tokens=400, ignore_eos=True)
            pieces = [next(stream).choices[0].delta.content or ""]  # the role chunk
            while not pieces[-1]:
                pieces.append(next(stream).choices[0].delta.content or "")  # decoding began
            before[method] = health(srv)
            if method == "spd":
                got_short = concurrently(lambda r: ask(client, r), short)
                during = health(srv)
            pieces += [c.choices[0].delta.content or "" for c in stream if c.choices]
            got[method] = "".join(pieces)
        lone_target = ask(client, {"prompt": "short 2", "method": "target", "max_tokens": 10})
        after = health(srv)
    assert got == {m: w[0] for m, w in want.items()}
    assert [g[:3] for g in got_short] == want_short
    assert not any(g[3]["started_alone"] for g in got_short)  # they found the long one
    assert not lone_target[3]["started_alone"]  # target-only: the pool's one row is fast
    assert [before[m]["alone"] for m in ("spd", "cospec")] == [int(solo)] * 2
    assert before["spd"]["batch_slots_in_use"] == ({} if solo else {"spd/k=3": 1})
    assert during["alone"] == 0 and during["batch_slots_in_use"]["spd/k=3"] == 1
    assert lone_target[:3] == alone(pair, arbiter, "target", "short 2", 3, 10)
    assert after["completed"] == 6 and after["errors"] == 0 and after["alone"] == 0
    if solo:  # spd alone as spd-staged (guesses), cospec alone as itself (none)
        assert len(guessed) == 2 and guessed[0] > 0 and guessed[1] == 0
    else:
        assert guessed == []


def test_a_lone_sampled_request_goes_alone_unless_seeded(pair, monkeypatch):
    """With the fast path's engines (COSPEC_STATIC=1 on the CPU) a lone sampled spd request
    without a seed decodes alone (each block on the device, ``device_blocks.sampled_block``);
    a seeded one keeps to the pool, so that its seed gives the same tokens with ``solo`` on
    and off."""
    monkeypatch.setenv("COSPEC_STATIC", "1")
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 12, "ignore_eos": True,
            "temperature": 0.8, "method": "spd", "k": 2}
    got = {}
    for solo in (True, False):
        with serve(pair, max_batch=2, solo=solo) as srv:
            url = srv.url + "/v1/completions"
            got[solo] = [httpx.post(url, json=b, timeout=60).json()
                         for b in (body, {**body, "seed": 5})]
    alone = {solo: [r["metrics"]["started_alone"] for r in rs] for solo, rs in got.items()}
    assert alone == {True: [True, False], False: [False, False]}
    assert got[True][1]["choices"][0]["text"] == got[False][1]["choices"][0]["text"]
    assert [r["usage"]["completion_tokens"] for rs in got.values() for r in rs] == [12] * 4


@pytest.mark.parametrize("alone", [False, True])
def test_disconnect_frees_the_slot_at_once(pair, monkeypatch, alone):
    """One slot: a streamed request whose client leaves after its first chunk gives its
    slot to the next queued request well before it would have finished. ``alone``: with the
    fast path's engines (COSPEC_STATIC=1 on the CPU) each request decodes alone on the
    batch-1 path; the one whose client left is cancelled, its generation closed, the next
    runs at once, and nothing is ever batched."""
    if alone:
        monkeypatch.setenv("COSPEC_STATIC", "1")
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 480, "ignore_eos": True,
            "temperature": 0, "method": "spd", "k": 1}
    with serve(pair, max_batch=1) as srv:
        url = srv.url + "/v1/completions"
        t0 = time.monotonic()
        assert httpx.post(url, json=body, timeout=60).status_code == 200
        full = time.monotonic() - t0
        with httpx.Client(timeout=30) as c, c.stream("POST", url,
                                                     json={**body, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break  # one chunk read, then the client goes away
        t0 = time.monotonic()
        r = httpx.post(url, json={**body, "max_tokens": 4}, timeout=60)
        waited = time.monotonic() - t0
        h = health(srv)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert r.json()["metrics"]["started_alone"] == alone
    assert waited < full / 3, (waited, full)
    assert h["cancelled"] == 1 and h["completed"] == 2 and h["active"] == 0
    assert h["alone"] == 0 and h["batch_slots_in_use"] == ({} if alone else {"spd/k=1": 0})


def test_too_long_for_a_slot_is_a_400(pair):
    """Slots of 64 positions: prompt + max_tokens (+ the k + 2 a step may run past the
    budget) must fit, else a 400 that names the limit; no max_tokens: what is left."""
    with serve(pair, max_context=64) as srv:
        def post(**kw):
            return httpx.post(srv.url + "/v1/completions", timeout=60, json={
                "model": MODEL, "temperature": 0, "method": "spd", "k": 4, **kw})

        n = len(pair.tokenizer("hello world " * 10)["input_ids"])
        ok = post(prompt="hello world " * 10, max_tokens=64 - n - 6)
        assert ok.status_code == 200, ok.text
        for kw in ({"max_tokens": 64 - n - 5}, {"max_tokens": 10**6}):
            r = post(prompt="hello world " * 10, **kw)
            err = r.json()["error"]
            assert r.status_code == 400 and err["code"] == "context_length_exceeded"
            assert "--max-context" in err["message"] and "64" in err["message"]
        r = post(prompt="hello world " * 40)
        assert r.status_code == 400 and "--max-context" in r.json()["error"]["message"]
        r = post(prompt="hello world " * 10, ignore_eos=True)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 64 - n - 6
        assert httpx.get(srv.url + "/v1/models").json()["data"][0]["max_model_len"] == 64
        assert health(srv)["errors"] == 0


@pytest.fixture(scope="module")
def pair32(pair):
    """The pair in float32, with a random third model for CoS of three models."""
    target = copy.deepcopy(pair.target).float()
    third = tiny_model(4, layers=1, vocab=target.config.vocab_size, dtype=torch.float32)
    return Pair(target, near_copy(target, 0.05), pair.tokenizer, MODEL, "tiny-draft",
                extra=(third,))


def two_models(pair3: Pair) -> Pair:
    return dataclasses.replace(pair3, extra=())


def recording(app) -> list:
    """Every job the app's scheduler is handed, in order (its ``batch`` says which path)."""
    seen, submit = [], app.state.engine.submit
    app.state.engine.submit = lambda job: (seen.append(job), submit(job))[1]
    return seen


def sent_at_once(pair, table, text, **app_kw):
    """The requests of ``table`` ((method, k, max_tokens, ignore_eos, stream) rows), prompt i
    ``text(i)``, sent at once to a server of ``pair`` (``app_kw``: ``create_app``'s). Returns
    (requests, what each gets from the batch-1 loop alone at T = 0, what each got,
    /health afterwards, each (method, k)'s path: its engine key, None for round robin)."""
    reqs = [{"prompt": text(i), "method": m, "max_tokens": n, "ignore_eos": ie, "stream": st,
             **({"k": k} if k else {})} for i, (m, k, n, ie, st) in enumerate(table)]
    want = [alone(pair, None, r["method"], r["prompt"], r.get("k", 4), r["max_tokens"],
                  r["ignore_eos"]) for r in reqs]
    assert {w[2] for w in want} == {"stop", "length"}
    app = create_app(pair, max_active=2, max_queue=32, timeout=60, **app_kw)
    jobs = recording(app)
    with BackgroundServer(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0,
                               timeout=60)
        got = concurrently(lambda r: ask(client, r), reqs)
        h = health(srv)
    return reqs, want, got, h, {(j.method.name, j.k): j.batch for j in jobs}


COS_REQUESTS = [  # method, k, max_tokens, ignore_eos, stream
    ("cos-we", 3, 24, False, False), ("cos-cd", 2, 40, True, True), ("we-sd", 3, 17, False, True),
    ("cd-sd", 3, 30, True, False), ("spd", 3, 24, False, True), ("target", None, 33, True, False),
    ("cos-we", 3, 36, True, True), ("we", 3, 21, False, False), ("cos-cd", 2, 12, False, True),
    ("cd", 3, 19, True, False), ("cos-we", 2, 27, True, False), ("we-sd", 3, 9, True, True),
]


@pytest.mark.parametrize("max_batch", [3, 16])
def test_cos_requests_batch_beside_the_others(pair32, max_batch):
    """The speculative CoS methods decode in batch engines beside spd and target (fp32,
    T = 0): each request gets exactly ``cos.cos_generate``'s tokens for its prompt alone;
    ``we`` and ``cd``, which no engine runs, still go round robin beside them."""
    methods = ["target", "spd", "cos-we", "cos-cd", "we-sd", "cd-sd", "we", "cd"]
    reqs, want, got, h, paths = sent_at_once(
        two_models(pair32), COS_REQUESTS,
        lambda i: f"cos {i}: hello world {'the answer ' * (i % 3)}{i}",
        methods=methods, max_batch=max_batch)
    assert [g[:3] for g in got] == want
    for r in reqs:
        key = (r["method"], r.get("k", 4))
        if r["method"] in ("we", "cd"):
            assert paths[key] is None  # round robin
        else:
            assert paths[key] == (r["method"], key[1] if r["method"] != "target" else 0)
    for r, (_, n, _, m) in zip(reqs, got):
        if r["method"] in ("cos-we", "cos-cd", "we-sd", "cd-sd"):
            k = r["k"]
            assert 1 <= m["steps"] < n and m["prefill_s"] > 0 and m["decode_s"] > 0
            # an alternate proposal (cos-*) counts as one more drafted token
            assert m["drafted"] >= k * m["steps"] and m["accepted"] <= m["drafted"]
            if r["method"].endswith("-sd"):
                assert m["drafted"] == k * m["steps"]
            assert m["from_draft"] <= m["accepted"]
    assert h["errors"] == 0 and h["completed"] == len(reqs) and h["active"] == 0


LOOKUP_REQUESTS = [  # method, k, max_tokens, ignore_eos, stream
    ("lookup", 3, 24, False, False), ("lookup", 2, 40, True, True),
    ("target", None, 17, False, True), ("spd-staged", 3, 30, True, False),
    ("lookup", 3, 36, True, True), ("spd", 3, 21, False, False),
    ("lookup", 2, 12, False, True), ("lookup", 3, 27, True, False),
]


@pytest.mark.parametrize("max_batch", [3, 16])
def test_lookup_requests_batch_beside_the_others(pair, max_batch):
    """Prompt lookup decodes in batch engines (one per k) beside target and spd: each
    request gets exactly the batch-1 loop's tokens (the target's, T = 0) for its prompt
    alone; spd-staged, which no engine runs, still goes round robin."""
    reqs, want, got, h, paths = sent_at_once(
        pair, LOOKUP_REQUESTS, lambda i: f"request {i}: hello world {'the answer ' * (i % 4)}{i}",
        methods=["target", "spd", "lookup", "spd-staged"], max_batch=max_batch, spec_off_at=0)
    assert [g[:3] for g in got] == want
    assert paths[("spd-staged", 3)] is None  # round robin
    assert paths[("target", 4)] == ("target", 0)
    assert {paths[("lookup", k)] for k in (2, 3)} == {("lookup", 2), ("lookup", 3)}
    looked = [(r, m) for r, (*_, m) in zip(reqs, got) if r["method"] == "lookup"]
    for r, m in looked:
        assert m["method"] == "lookup" and m["steps"] >= 1 and m["from_draft"] <= m["accepted"]
        assert m["accepted"] <= m["drafted"] <= r["k"] * m["steps"]
    assert sum(m["accepted"] for _, m in looked) > 0  # the lookups paid somewhere
    assert h["errors"] == 0 and h["completed"] == len(reqs) and h["active"] == 0


def test_memory_budget_counts_the_prefill_pass(pair, monkeypatch):
    """The start-up budget counts the KV caches and the largest prefill pass (8,192 padded
    tokens, or one prompt of the whole context: its attention scores grow with the context):
    where only the caches would fit, the server is refused at start with both figures, not
    run out of memory at its first long prompt."""
    from cospec import batch_scheduler as bs
    from cospec.errors import CospecError

    models = [pair.target, pair.draft]
    kv, prefill = bs.kv_bytes(models, 4, 256), bs.prefill_bytes(models, 256)
    assert prefill > 0 and bs.prefill_bytes(models, 512) == 2 * prefill  # linear to 8,192
    assert bs.prefill_bytes(models, 16384) == 4 * bs.prefill_bytes(models, 8192)  # then square
    monkeypatch.setattr(bs, "available_ram", lambda: int((kv + prefill) / 0.9) + 64)
    assert bs.check_memory(models, 4, 256) == (kv, prefill)
    assert bs.check_memory(models, 1, 256, 3) == (kv, prefill)  # spd's rows beside count
    monkeypatch.setattr(bs, "available_ram", lambda: int((kv + prefill) / 0.9) - 64)
    with pytest.raises(CospecError, match="of KV cache and .* GiB for a prefill pass"):
        bs.check_memory(models, 4, 256)
    with pytest.raises(CospecError, match="lower --max-batch or --max-context"):
        create_app(pair, methods=["target", "spd"], max_batch=4, max_context=256,
                   spec_off_at=0)
    create_app(pair, methods=["target", "spd"], max_batch=2, max_context=256, spec_off_at=0)
    with pytest.raises(CospecError,
                       match=r"--max-batch 2 \(\+ 2 rows of a speculating engine"):
        create_app(pair, methods=["target", "spd"], max_batch=2, max_context=256)


def test_cos_with_a_middle_model(pair32, monkeypatch):
    """CoS of three models (draft, a middle model, target) decodes in a batch engine with
    the batch-1 tokens, and the KV budget counts the middle model's caches too."""
    from cospec import server

    budgets = []
    real = server.check_memory
    monkeypatch.setattr(server, "check_memory",
                        lambda models, rows, n, extra=0: budgets.append(models)
                        or real(models, rows, n, extra))
    reqs = [{"prompt": f"three {i} hello", "method": m, "k": 3, "max_tokens": 20 + 3 * i,
             "ignore_eos": bool(i % 2), "stream": bool(i % 3)}
            for i, m in enumerate(["cos-we", "we-sd", "cos-we", "we", "cos-we"])]
    want = [alone(pair32, None, r["method"], r["prompt"], 3, r["max_tokens"], r["ignore_eos"])
            for r in reqs]
    app = create_app(pair32, methods=["target", "cos-we", "we-sd", "we"], max_active=2,
                     max_queue=8, timeout=60, max_batch=4)
    jobs = recording(app)
    with BackgroundServer(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0,
                               timeout=60)
        got = concurrently(lambda r: ask(client, r), reqs)
    assert [g[:3] for g in got] == want
    assert len(jobs) == len(reqs)
    assert {(j.method.name, j.batch) for j in jobs} == {("cos-we", ("cos-we", 3)),
                                                        ("we-sd", ("we-sd", 3)), ("we", None)}
    (models,) = budgets
    ids = {id(m) for m in models}
    assert ids == {id(pair32.target), id(pair32.draft), id(pair32.extra[0])}


@pytest.mark.parametrize("off_at", [0, 3])
def test_warm_up_serves_from_the_warmed_engine(pair, monkeypatch, caplog, off_at):
    """``warm_up=True`` (``--warm-up``) builds the default method's engine (spd at the
    server's k) over every slot with its graphs captured (CUDA graphs stood in on the CPU);
    requests of that method are served by it, capture nothing more and get the batch-1
    tokens. While speculation goes off under load (``spec_off_at`` 3), spd's engine has 2
    rows beside the 4 slots and the target-only engine all 4, both warmed; the requests
    that start speculating go target-only once 3 are live. Without graphs (the CPU as it
    is) it does nothing and says so."""
    import logging

    from fake_graphs import fake_graphs

    with caplog.at_level(logging.INFO, logger="cospec.server"):
        app = create_app(pair, methods=["target", "spd"], k=3, max_batch=4, warm_up=True,
                         spec_off_at=off_at)
    assert app.state.engine.pool.groups == []
    assert "no CUDA graphs on cpu: nothing to warm up" in caplog.text
    made = fake_graphs(monkeypatch)
    with caplog.at_level(logging.INFO, logger="cospec.server"):
        app = create_app(pair, methods=["target", "spd"], k=3, max_batch=4, max_queue=8,
                         timeout=60, warm_up=True, spec_off_at=off_at)
    groups = app.state.engine.pool.groups
    warmed, engines = len(made), [g.engine for g in groups]
    want_groups = [(("spd", 3), 4)] if not off_at else [(("spd", 3), 2), (("target", 0), 4)]
    assert [(g.key, g.size) for g in groups] == want_groups and warmed > 0
    assert {b for _, b, _, _ in made} == {1, 2, 4}
    assert caplog.text.count("--warm-up: ") == 1 + len(groups) + 4  # nothing alone, 2 x 2
    reqs = [{"prompt": f"warm {i} hello world", "max_tokens": 10 + 7 * i, "ignore_eos": i == 2,
             "stream": bool(i % 2)} for i in range(4)]
    want = [alone(pair, None, "spd", r["prompt"], 3, r["max_tokens"], r["ignore_eos"])
            for r in reqs]
    with BackgroundServer(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0,
                               timeout=60)
        got = concurrently(lambda r: ask(client, r), reqs)
    assert [g[:3] for g in got] == want
    assert len(made) == warmed and [g.engine for g in groups] == engines
    off = sum(g[3]["speculation_off"] for g in got)
    assert off >= 2 if off_at else off == 0


def test_warm_up_makes_the_lone_path_engines_at_full_context(pair, monkeypatch, caplog):
    """With the fast path's engines (COSPEC_STATIC=1 on the CPU), ``--warm-up`` also runs a
    few tokens of the default method alone with room for the whole context: its batch-1
    engines are made at full size, and a lone request later reuses them. Greedy, it starts
    from a prompt of every length that the engines' prefill graphs tell apart (each up to
    fast.MAX_GRAPH tokens, then one more: a fill from slot 0), so that no request's first
    token waits for a graph capture."""
    import logging

    from cospec import fast
    from cospec.methods import Method
    from cospec.sampling import GREEDY
    from cospec.server import REQUEST_SAMPLING

    monkeypatch.setenv("COSPEC_STATIC", "1")
    for model in (pair.target, pair.draft):
        fast._FREE.pop(model, None)
    warmed, real_stream = [], Method.stream

    def stream(self, prompt_ids, **kw):
        warmed.append((kw["sampling"], len(prompt_ids)))
        return real_stream(self, prompt_ids, **kw)

    with monkeypatch.context() as m, caplog.at_level(logging.INFO, logger="cospec.server"):
        m.setattr(Method, "stream", stream)
        app = create_app(pair, methods=["target", "spd"], k=3, max_batch=4, max_queue=8,
                         timeout=60, warm_up=True, spec_off_at=0)
    for how in ("greedy", "at temperature 1"):  # spd's lone requests decode as spd-staged
        assert (f"--warm-up: spd (as spd-staged) alone at k=3, {how}, 512 tokens of context"
                in caplog.text)
    longest = fast.MAX_GRAPH + 1  # a default request's block graph too, from one prompt
    assert warmed == [(GREEDY, n) for n in range(1, longest + 1)] + [(REQUEST_SAMPLING, longest)]
    engines = {m: list(fast._FREE[m]) for m in (pair.target, pair.draft)}
    assert all(len(e) == 1 and e[0].max_len >= 512 for e in engines.values())
    want = alone(pair, None, "spd", "warm hello", 3, 20)
    with BackgroundServer(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0,
                               timeout=60)
        got = ask(client, {"prompt": "warm hello", "method": "spd", "k": 3, "max_tokens": 20})
    assert got[:3] == want and got[3]["steps"] >= 1
    assert {m: list(fast._FREE[m]) for m in engines} == engines  # the same engines, reused


def test_first_token_leaves_before_its_step_ends(pair, monkeypatch):
    """A target-only step decodes several tokens a row; a stream's first token is sent as
    soon as it is decoded, not when the step ends (each step here lasts a second more)."""
    from cospec.fast_batch import BatchEngine

    real = BatchEngine.step

    def slow(self, early=None):
        out = real(self, early)
        time.sleep(1.0)
        return out

    monkeypatch.setattr(BatchEngine, "step", slow)
    want = alone(pair, None, "target", "first things first", 4, 6, True)
    with serve(pair, max_batch=2) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0,
                               timeout=60)
        t0 = time.monotonic()
        stream = chat(client, "first things first", stream=True, method="target",
                      max_tokens=6, ignore_eos=True)
        pieces, first = [], None
        for c in stream:
            if c.choices and c.choices[0].delta.content:
                first = first or time.monotonic() - t0
                pieces.append(c.choices[0].delta.content)
        total = time.monotonic() - t0
    assert "".join(pieces) == want[0]
    assert total > 1.0 and first < total - 0.6, (first, total)


def test_a_max_context_past_the_models_is_capped_and_said(pair, caplog):
    """--max-context beyond the models' positions serves their positions, with a warning."""
    from cospec.models import context_length

    ctx = context_length(pair)
    with caplog.at_level("WARNING", logger="cospec.server"):
        app = create_app(pair, methods=["target"], max_batch=0, max_context=ctx + 1000)
    assert app is not None
    assert f"max_context {ctx + 1000} is past the models' {ctx} positions" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="cospec.server"):
        create_app(pair, methods=["target"], max_batch=0, max_context=ctx)
    assert "past the models'" not in caplog.text
