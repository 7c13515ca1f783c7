"""The decode loop: greedy SPD equals greedy decoding; caches stay consistent."""

import copy

import pytest
import torch

from cospec import decoding
from cospec.acceptance import ExactRule
from cospec.decoding import CachedLM, Speculation, generate, warm_up_budgets
from cospec.errors import CospecError
from cospec.stats import DecodeStats


def prompt(seed: int, n: int = 6) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 96, (n,), generator=g).tolist()


def hf_greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n,
                         min_new_tokens=n, pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()


def run(verifier, proposer, ids, k, n, stats=None):
    return [t.id for t in generate(verifier, proposer, ids, ExactRule(), k=k,
                                   max_new_tokens=n, stats=stats)]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_spd_greedy_matches_target_and_transformers(target, draft, seed, k):
    ids = prompt(seed)
    ref = hf_greedy(target, ids, 40)
    assert run(target, None, ids, k, 40) == ref          # target-only through our loop
    stats = DecodeStats()
    assert run(target, draft, ids, k, 40, stats) == ref  # random draft: little accepted
    assert stats.acceptance_rate < 0.5
    assert stats.generated == 40


@pytest.mark.parametrize("k", [1, 3, 5])
def test_warm_up_budgets_meet_every_verify_shape(target, draft, monkeypatch, k):
    """Generations of the warm-up budgets verify blocks of every row count 1..k + 1 (the
    shapes a timed generation can meet, its last block cut to the tokens left)."""
    seen = set()
    score = Speculation.score
    monkeypatch.setattr(Speculation, "score", lambda team, seq, prop, sampling: (
        seen.add(len(prop.tokens) + 1), score(team, seq, prop, sampling)))
    for budget in warm_up_budgets(k):
        assert len(run(target, draft, prompt(9), k, budget)) == budget
    assert seen == set(range(1, k + 2))


@pytest.mark.parametrize("queued", [0, 1, 2])
def test_target_only_queues_chunks_ahead_and_stops_where_asked(target, monkeypatch, queued):
    """Target-only decodes RUN_AHEAD tokens a host read with ``queued`` more chunks launched
    before it reads one (as on a GPU): transformers' greedy tokens for every budget and up to
    an EOS, the first token read once (queued + 1) chunks are drawn, a step and a token
    counted for each token handed out, and an early stop keeps the count of what was taken."""
    monkeypatch.setattr(decoding, "_queued", lambda device: queued)
    drawn = []
    draw = decoding._draw
    monkeypatch.setattr(decoding, "_draw", lambda *a: drawn.append(1) or draw(*a))
    ids = prompt(5)
    ref = hf_greedy(target, ids, 23)
    for budget in (1, 4, 5, 23):
        assert run(target, None, ids, 4, budget) == ref[:budget]
    eos = ref[9]
    stats = DecodeStats()
    toks = [t.id for t in generate(target, None, ids, ExactRule(), max_new_tokens=23,
                                   eos_ids=[eos], stats=stats)]
    assert toks == ref[:ref.index(eos) + 1]
    assert stats.generated == stats.steps == len(toks) and stats.decode_s > 0
    drawn.clear()
    stats = DecodeStats()
    tokens = generate(target, None, ids, ExactRule(), max_new_tokens=23, stats=stats)
    assert next(tokens).id == ref[0]
    assert len(drawn) == (queued + 1) * decoding.RUN_AHEAD   # chunks launched before a read
    assert next(tokens).id == ref[1]
    tokens.close()
    assert stats.generated == 2 and stats.decode_s > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_target_only_queues_ahead_on_the_gpu_and_keeps_transformers_tokens(target):
    """On a GPU target-only queues QUEUED chunks ahead and still gives transformers' greedy
    tokens (float32), for budgets across the chunks and up to an EOS."""
    assert decoding._queued(torch.device("cuda")) == decoding.QUEUED >= 1
    model = copy.deepcopy(target).cuda()
    ids = prompt(6)
    ref = hf_greedy(target, ids, 30)
    for budget in (3, 9, 30):
        assert run(model, None, ids, 4, budget) == ref[:budget]
    eos = ref[13]
    assert [t.id for t in generate(model, None, ids, ExactRule(), max_new_tokens=30,
                                   eos_ids=[eos])] == ref[:ref.index(eos) + 1]


@pytest.mark.parametrize("k", [1, 4, 7])
def test_draft_equal_to_target_accepts_everything(target, k):
    ids = prompt(3)
    stats = DecodeStats()
    assert run(target, target, ids, k, 33, stats) == hf_greedy(target, ids, 33)
    assert stats.accepted == stats.drafted
    # every step commits k + 1 tokens, but the last one, which the budget cuts short
    assert stats.steps == -(-33 // (k + 1))


def test_from_draft_flags_and_eos(target):
    ids = prompt(4)
    ref = hf_greedy(target, ids, 30)
    eos = ref[10]  # pretend the 11th token is EOS
    toks = list(generate(target, target, ids, ExactRule(), k=4, max_new_tokens=30,
                         eos_ids=[eos]))
    assert [t.id for t in toks] == ref[:ref.index(eos) + 1]
    assert any(t.from_draft for t in toks)


def test_crop_matches_fresh_recompute(target):
    ids = prompt(5, 12)
    lm = CachedLM(target)
    lm.forward(ids, keep=1)
    lm.crop(7)
    got, _ = lm.forward(ids[7:10], keep=3)
    fresh = CachedLM(target)
    want, _ = fresh.forward(ids[:10], keep=3)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert lm.length == 10


def test_failed_step_leaves_a_usable_state(target, draft):
    class Boom(ExactRule):
        calls = 0

        def __call__(self, prop, sampling, gen):
            Boom.calls += 1
            if Boom.calls == 3:
                raise RuntimeError("boom")
            return super().__call__(prop, sampling, gen)

    ids = prompt(6)
    stream = generate(target, draft, ids, Boom(), k=3, max_new_tokens=30)
    got = []
    with pytest.raises(RuntimeError):
        for t in stream:
            got.append(t.id)
    ref = hf_greedy(target, ids, 30)
    assert got == ref[:len(got)] and got  # what was yielded before the error is right


def test_inference_mode_only_inside_the_loop(target, draft):
    """Both loops run in inference mode but hand the caller back its own mode at every
    yield, so generators of several requests can be interleaved (the server does)."""
    from cospec.cos import Combination, cos_generate

    ids = prompt(4)
    streams = [generate(target, draft, ids, ExactRule(), k=2, max_new_tokens=12),
               generate(target, None, ids, ExactRule(), max_new_tokens=12),
               cos_generate([draft, target], ids, Combination("we", (0.5, 0.5)), "cos-we",
                            gamma=2, max_new_tokens=12)]
    for _ in range(3):
        for stream in streams:
            next(stream)
            assert not torch.is_inference_mode_enabled()
    for stream in streams:
        stream.close()
        assert not torch.is_inference_mode_enabled()


def test_bad_arguments(target, draft):
    with pytest.raises(CospecError):
        list(generate(target, draft, [], ExactRule()))
    with pytest.raises(CospecError):
        list(generate(target, draft, [3, 4], ExactRule(), k=0))


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 16, 17])
def test_small_rows_linear_equals_linear(rows):
    from cospec.cpu import SmallRowsLinear

    g = torch.Generator().manual_seed(rows)
    layer = torch.nn.Linear(64, 48)
    x = torch.randn(1, rows, 64, generator=g)
    want = layer(x)
    with SmallRowsLinear():
        got = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.shape == want.shape


def test_order_choice_tries_both_then_keeps_the_faster():
    from cospec.cpu import TRIALS, OrderChoice

    choice, clock = OrderChoice(), {"plain": 2.0, "weight-first": 1.0}
    picks = []
    for _ in range(2 * TRIALS + 4):
        order = choice.pick(3)
        picks.append(order)
        choice.record(3, order, clock[order])
    assert sorted(picks[:2 * TRIALS]) == ["plain"] * TRIALS + ["weight-first"] * TRIALS
    assert picks[2 * TRIALS:] == ["weight-first"] * 4
    assert choice.pick(2) == "plain"  # another row count is measured afresh


def test_fast_linear_only_where_it_can_serve(monkeypatch):
    from tiny import tiny_model

    from cospec import cpu

    big = tiny_model(1, width=256, dtype=torch.float32)
    cpu_ = torch.device("cpu")

    def forward(model, rows):
        with cpu.fast_linear(model, cpu_, 1, rows):
            return model(input_ids=torch.arange(rows).view(1, -1) + 2).logits

    want = {rows: big(input_ids=torch.arange(rows).view(1, -1) + 2).logits for rows in (3, 17)}
    for _ in range(2 * cpu.TRIALS + 1):  # auto: both orders timed on real forwards, then one
        torch.testing.assert_close(forward(big, 3), want[3], rtol=1e-4, atol=1e-4)
    assert [len(v) for v in cpu._choices[big].seconds[3].values()] == [cpu.TRIALS] * 2
    forward(big, 17)  # more rows than the rewrite serves: untimed
    small = tiny_model(1)
    forward(small, 3)  # a small model: untimed
    assert list(cpu._choices[big].seconds) == [3] and small not in cpu._choices
    monkeypatch.setenv("COSPEC_LINEAR", "fastest")
    with pytest.raises(CospecError, match="COSPEC_LINEAR"):
        forward(big, 3)
