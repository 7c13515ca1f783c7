"""What a pair's models allow: models of one tokenizer whose output layers are padded to
different widths (Qwen2.5-7B: 152,064 rows, 0.5B: 151,936) decode together, the wider cut to
the narrower's rows; a generation that would run past their positions is refused."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from cospec import load_pair
from cospec.errors import CospecError
from cospec.models import share_output_width


@pytest.fixture(scope="module")
def padded_pair(tmp_path_factory):
    """A target padded 8 rows past its tokenizer, a draft padded 2 (one tokenizer)."""
    root = tmp_path_factory.mktemp("padded")
    tok = tiny_tokenizer()
    for name, seed, pad in (("target", 1, 8), ("draft", 2, 2)):
        tiny_model(seed, vocab=len(tok) + pad, dtype=torch.float32).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return str(root / "target"), str(root / "draft"), len(tok)


@pytest.mark.parametrize("method, temperature", [("spd", 1.0), ("cos-we", 1.0), ("cd", 0.0),
                                                 ("spd", 0.0)])
def test_a_pair_padded_differently_decodes(padded_pair, method, temperature):
    target, draft, ids = padded_pair
    pair = load_pair(target, draft, device="cpu")
    widths = {m.get_output_embeddings().weight.shape[0] for m in (pair.target, pair.draft)}
    assert widths == {ids + 2}
    out = pair.generate([5, 17, 33], method=method, max_new_tokens=12, temperature=temperature,
                        seed=3)
    assert len(out.token_ids) == 12 and all(0 <= t < ids + 2 for t in out.token_ids)


def test_greedy_spd_is_the_cut_targets_greedy(padded_pair):
    """Cutting padding rows leaves the target's greedy output as it was (the padding rows
    never win): spd on the cut pair equals target-only on the uncut target."""
    target, draft, _ = padded_pair
    alone = load_pair(target, False, device="cpu").generate([5, 17, 33], method="target",
                                                            max_new_tokens=16)
    spd = load_pair(target, draft, device="cpu").generate([5, 17, 33], method="spd",
                                                          max_new_tokens=16)
    assert spd.token_ids == alone.token_ids


def test_a_head_narrower_than_the_tokenizer_is_refused():
    a, b = tiny_model(1, vocab=40), tiny_model(2, vocab=48)
    with pytest.raises(CospecError, match="cannot score every token"):
        share_output_width([("a", a), ("b", b)], ids=44)


def test_a_generation_past_the_models_context_is_refused(tiny_dirs):
    """tiny models have 512 positions: a 500-token prompt with 8 new tokens fits, with 20
    it would run past them (silently, without the check)."""
    target, draft = map(str, tiny_dirs)
    pair = load_pair(target, draft, device="cpu")
    prompt = [5] * 500
    assert len(pair.generate(prompt, method="spd", max_new_tokens=8).token_ids) <= 8
    with pytest.raises(CospecError, match="ask for at most 12 new tokens"):
        pair.generate(prompt, method="spd", max_new_tokens=20)
