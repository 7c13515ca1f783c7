"""Tests on the real default pair (large download): run with ``pytest -m real``."""

import pytest

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def real():
    """(pair, prompt ids, EOS ids, the target's own greedy tokens: 24 of them)."""
    from cospec.acceptance import ExactRule
    from cospec.decoding import generate
    from cospec.methods import encode_prompt, eos_ids
    from cospec.models import DEFAULT_DRAFT, DEFAULT_TARGET, load_pair, set_cpu_threads

    set_cpu_threads()
    pair = load_pair(DEFAULT_TARGET, DEFAULT_DRAFT, device="cpu")
    ids = encode_prompt(pair.tokenizer, "Write a Python function that reverses a string.")
    eos = eos_ids(pair.tokenizer, pair.target)
    want = [t.id for t in generate(pair.target, None, ids, ExactRule(), max_new_tokens=24,
                                   eos_ids=eos)]
    return pair, ids, eos, want


def run(real, rule):
    from cospec.decoding import generate

    pair, ids, eos, _ = real
    return [t.id for t in generate(pair.target, pair.draft, ids, rule, k=4, max_new_tokens=24,
                                   eos_ids=eos)]


def test_real_pair_spd_equals_target_greedy(real):
    from cospec.acceptance import ExactRule

    got = run(real, ExactRule())
    assert got == real[3]
    assert "def" in real[0].tokenizer.decode(got)


def test_real_pair_cospec_arbiters(real):
    """On real shapes (152k vocabulary): an always-TARGET arbiter is the target; the shipped
    arbiter loads for this pair and decodes through the same rule."""
    from cospec.acceptance import ArbiterRule
    from cospec.arbiter import ConstantPolicy, load_arbiter
    from cospec.methods import SHIPPED_ARBITER

    assert run(real, ArbiterRule(ConstantPolicy(0.0))) == real[3]
    pair = real[0]
    shipped = load_arbiter(SHIPPED_ARBITER, (pair.target_name, pair.draft_name))
    got = run(real, ArbiterRule(shipped, shipped.threshold))
    assert len(got) == 24 and "def" in pair.tokenizer.decode(got)
