"""The decode loop: greedy SPD equals greedy decoding; caches stay consistent."""

import pytest
import torch

from cospec.acceptance import ExactRule
from cospec.decoding import CachedLM, generate
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


def test_bad_arguments(target, draft):
    with pytest.raises(CospecError):
        list(generate(target, draft, [], ExactRule()))
    with pytest.raises(CospecError):
        list(generate(target, draft, [3, 4], ExactRule(), k=0))


@pytest.mark.parametrize("mode", ["auto", "weight-first"])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 16, 17])
def test_small_rows_linear_equals_linear(rows, mode):
    from cospec import cpu

    g = torch.Generator().manual_seed(rows)
    layer = torch.nn.Linear(64, 48)
    x = torch.randn(1, rows, 64, generator=g)
    want = layer(x)
    with cpu.SmallRowsLinear(mode=mode):
        got = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.shape == want.shape
    if mode == "auto" and 1 < rows <= cpu.MAX_ROWS:  # the order was measured, and kept
        assert (rows, 48, 64) in cpu._weight_first_wins


def test_fast_linear_only_where_it_can_serve(monkeypatch):
    from tiny import tiny_model

    from cospec import cpu

    big = tiny_model(1, width=256, dtype=torch.float32)
    cpu_ = torch.device("cpu")
    assert isinstance(cpu.fast_linear(big, cpu_, 4), cpu.SmallRowsLinear)
    for model, rows in ((big, 1), (big, cpu.MAX_ROWS + 1), (tiny_model(1), 4)):
        assert not isinstance(cpu.fast_linear(model, cpu_, rows), cpu.SmallRowsLinear)
    monkeypatch.setenv("COSPEC_LINEAR", "plain")
    assert not isinstance(cpu.fast_linear(big, cpu_, 4), cpu.SmallRowsLinear)
    monkeypatch.setenv("COSPEC_LINEAR", "fastest")
    with pytest.raises(CospecError, match="COSPEC_LINEAR"):
        cpu.fast_linear(big, cpu_, 4)
