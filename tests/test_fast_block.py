"""Greedy speculative decoding with each block on the device (``cospec.fast_block``) gives the
target's plain greedy tokens: with a draft that always agrees (every block fully accepted,
the draft two tokens behind), one that partly agrees and one that never does; for k = 1, 2,
5; up to an EOS and up to max_new_tokens; from a two-token prompt; on the CPU and, where one
is present, through CUDA graphs on a GPU: the steps' graphs, or each block one graph."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model

from cospec import fast_block
from cospec.acceptance import ExactRule
from cospec.decoding import generate
from cospec.errors import CospecError
from cospec.stats import DecodeStats

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


def drafts(device: str) -> dict[str, torch.nn.Module]:
    same = tiny_model(11, dtype=torch.float32)
    near = tiny_model(11, dtype=torch.float32)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in near.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    other = tiny_model(12, layers=1, dtype=torch.float32)
    return {name: m.to(device) for name, m in
            (("same", same), ("near", near), ("other", other))}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("graph", [False, True])
def test_tokens_are_the_targets_greedy(monkeypatch, device, graph):
    """(graph: each block one CUDA graph on a GPU; on the CPU it falls back to the steps.)"""
    monkeypatch.setenv("COSPEC_STATIC", "1")
    fast_block._GRAPHS.clear()
    target = tiny_model(11, dtype=torch.float32).to(device)
    accepted, models = {}, drafts(device)  # kept: a draft's graphs go with its engine
    for name, draft in models.items():
        for prompt in ([5, 17, 33, 2, 60, 41], [3, 9]):
            plain = [t.id for t in generate(target, None, prompt, ExactRule(),
                                            max_new_tokens=30)]
            for k in (1, 2, 5):
                for eos in ((), (plain[7],)):
                    want = [t.id for t in generate(target, None, prompt, ExactRule(),
                                                   max_new_tokens=30, eos_ids=eos)]
                    stats = DecodeStats()
                    got = fast_block.spd_greedy(target, draft, prompt, k=k, max_new_tokens=30,
                                                eos_ids=eos, stats=stats, graph=graph)
                    assert got == want, (name, prompt, k, eos)
                    if name == "same":  # the target as its own draft: every block accepted
                        assert stats.accepted == k * stats.steps
                    accepted[name] = accepted.get(name, 0) + stats.accepted
                    assert stats.steps >= 1 and stats.generated == len(want)
                    assert stats.prefill_s > 0 and stats.decode_s > 0  # both timed
    assert accepted["same"] > accepted["near"] > accepted["other"] == 0
    made = sum(len(ks) for by_draft in fast_block._GRAPHS.values() for ks in by_draft.values())
    assert made == (3 * 3 if graph and device == "cuda" else 0)  # a graph a draft and k


def test_bad_input_is_refused_and_no_budget_gives_nothing():
    model = tiny_model(11, dtype=torch.float32)
    assert fast_block.spd_greedy(model, model, [5, 6], k=2, max_new_tokens=0) == []
    with pytest.raises(CospecError, match="two or more tokens"):
        fast_block.spd_greedy(model, model, [5], k=2)
    with pytest.raises(CospecError, match="k"):
        fast_block.spd_greedy(model, model, [5, 6], k=0)


def test_block_graph_setting_is_checked(monkeypatch):
    """COSPEC_BLOCK_GRAPH takes 0 or 1; anything else is refused by name, not ignored."""
    model = tiny_model(11, dtype=torch.float32)
    monkeypatch.setenv("COSPEC_BLOCK_GRAPH", "yes")
    with pytest.raises(CospecError, match="COSPEC_BLOCK_GRAPH='yes'"):
        fast_block.spd_greedy(model, model, [5, 6], k=2, max_new_tokens=4)
    monkeypatch.setenv("COSPEC_BLOCK_GRAPH", "1")  # on the CPU: the steps, the same tokens
    assert len(fast_block.spd_greedy(model, model, [5, 6], k=2, max_new_tokens=4)) == 4
