"""Tests on the real default pair (large download): run with ``pytest -m real``."""

import pytest

pytestmark = pytest.mark.real

NEW = 24  # new tokens per generation


@pytest.fixture(scope="module")
def real():
    """(pair, prompt ids, EOS ids, transformers' own greedy tokens: NEW of them, fp32 CPU)."""
    import torch

    from cospec.methods import encode_prompt, eos_ids
    from cospec.models import DEFAULT_DRAFT, DEFAULT_TARGET, load_pair, set_cpu_threads

    set_cpu_threads()
    pair = load_pair(DEFAULT_TARGET, DEFAULT_DRAFT, device="cpu")
    assert next(pair.target.parameters()).dtype == torch.float32
    ids = encode_prompt(pair.tokenizer, "Write a Python function that reverses a string.")
    eos = eos_ids(pair.tokenizer, pair.target)
    x = torch.tensor([ids])
    with torch.inference_mode():  # plain greedy search: no sampling, no logits processors
        out = pair.target.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                   max_new_tokens=NEW, eos_token_id=eos, pad_token_id=eos[0],
                                   repetition_penalty=1.0, num_beams=1)
    want = out[0, len(ids):].tolist()
    return pair, ids, eos, want


def run(real, rule, draft=True):
    from cospec.decoding import generate

    pair, ids, eos, _ = real
    return [t.id for t in generate(pair.target, pair.draft if draft else None, ids, rule, k=4,
                                   max_new_tokens=NEW, eos_ids=eos)]


def test_real_pair_target_and_spd_equal_transformers_greedy(real):
    from cospec.acceptance import ExactRule

    want = real[3]
    assert len(want) == NEW and "def" in real[0].tokenizer.decode(want)
    assert run(real, ExactRule(), draft=False) == want  # target-only through cospec's loop
    assert run(real, ExactRule()) == want


def test_real_pair_cospec_arbiters(real):
    """On real shapes (152k vocabulary): an always-TARGET arbiter is transformers' greedy
    target; the shipped arbiter loads for this pair and decodes through the same rule."""
    from cospec.arbiter import ArbiterRule, ConstantPolicy, load_arbiter
    from cospec.methods import SHIPPED_ARBITER

    assert run(real, ArbiterRule(ConstantPolicy(0.0))) == real[3]
    pair = real[0]
    shipped = load_arbiter(SHIPPED_ARBITER, (pair.target_name, pair.draft_name))
    got = run(real, ArbiterRule(shipped, shipped.threshold))
    assert len(got) == NEW and "def" in pair.tokenizer.decode(got)
