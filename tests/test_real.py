"""Tests on the real default pair (large download): run with ``pytest -m real``."""

import pytest

pytestmark = pytest.mark.real


def test_real_pair_spd_equals_target_greedy():
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
    got = [t.id for t in generate(pair.target, pair.draft, ids, ExactRule(), k=4,
                                  max_new_tokens=24, eos_ids=eos)]
    assert got == want
    assert "def" in pair.tokenizer.decode(got)
