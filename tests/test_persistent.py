"""Every layer of a one-row step in one persistent launch (``cospec.persistent``) computes what
the reference layers compute.

On CPU under triton's interpreter (TRITON_INTERPRET=1, as test_fused.py): the interpreter runs
one program, which takes every task in order, so the waits never spin there; what they
check is the tasks' arithmetic (q/k/v with RoPE and the cache write, the attention, the
projections and residual adds, the norms), the task numbering and the counters' stages.
``test_cuda_graphs`` runs it compiled, its programs side by side, inside CUDA graphs.
"""

import os

import pytest
import torch
from tiny import tiny_model
from transformers import Qwen2Config, Qwen2ForCausalLM

from cospec import fast, fused
from cospec.decoding import CachedLM
from cospec.errors import CospecError

pytest.importorskip("triton")
ATOL = RTOL = 1e-5


def odd_model(o_bias: bool) -> Qwen2ForCausalLM:
    """A tiny float32 Qwen2 whose sizes are no powers of two (hidden 48, 6 heads of 8 over
    2 kv heads, MLP 80): every tile's last block is partly masked; ``o_bias``: o_proj with
    a bias (Qwen2's has none)."""
    torch.manual_seed(21)
    cfg = Qwen2Config(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.2, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).to(torch.float32).eval()
    if o_bias:
        for layer in model.model.layers:
            o = layer.self_attn.o_proj
            o.bias = torch.nn.Parameter(torch.randn(o.out_features) * 0.3)
    return model


@pytest.fixture
def calls(monkeypatch):
    """Counts the persistent launches (and makes them the path one-row steps take)."""
    from cospec import persistent

    monkeypatch.setattr(fused, "PERSISTENT", 1)
    made = []
    launch = persistent.step_layers
    monkeypatch.setattr(persistent, "step_layers", lambda *a: made.append(1) or launch(*a))
    return made


@pytest.mark.parametrize("o_bias,tiles", [(False, (2, 8, 16, 4, 16, 32, 4, 4)),
                                          (True, (4, 32, 8, 32, 32, 64, 16, 8)),
                                          (False, (1, 1, 1, 1, 128, 1024, 64, 1))])
def test_steps_match_transformers(interpret, monkeypatch, calls, o_bias, tiles):
    """One-row steps (and 4-token verifies between them, on the five kernels) from a prefill
    of 9 tokens: the engine's logits are transformers' to 1e-5, tiles smaller than the
    shapes (several tasks a stage, masked last blocks, attention blocks of 4 slots), larger
    than them, and of one column; each head's attention in 4, 8 (three shares empty at the
    first step: 10 slots in shares of 2) or 1 share."""
    names = ("PERSIST_QKV_BLOCK_C", "PERSIST_OUT_BLOCK_N", "PERSIST_UP_BLOCK_N",
             "PERSIST_DOWN_BLOCK_N", "PERSIST_BLOCK_K", "PERSIST_DOWN_BLOCK_K",
             "PERSIST_BLOCK_S", "PERSIST_SPLITS")
    for name, value in zip(names, tiles):
        monkeypatch.setattr(fused, name, value)
    monkeypatch.setenv("COSPEC_FUSED", "1")
    model = odd_model(o_bias)
    ids = torch.randint(2, 96, (30,), generator=torch.Generator().manual_seed(3)).tolist()
    lm, ref = fast.StaticLM(model, max_len=64), CachedLM(model)
    rows = 0
    with torch.inference_mode():
        for a, b in fast.side_by_side(lm, ref, ids, start=9, steps=6, verify=4, reject=1,
                                      every=2):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
            rows += len(a)
    assert len(calls) == 3 and rows == 3 + 3 * 4


def test_greedy_tokens_identical(interpret, monkeypatch, calls):
    """Target-only and speculative greedy decoding with one-row steps in one launch give the
    plain (transformers, DynamicCache) decoding's tokens."""
    from test_fused import plain_and_fused_tokens

    want, got = plain_and_fused_tokens(monkeypatch, tiny_model(11, dtype=torch.float32),
                                       tiny_model(12, layers=1, dtype=torch.float32))
    assert got == want and len(got[0]) == 6 and len(calls) >= 5


def test_a_stage_that_never_finishes_gives_nan_not_a_hang(interpret, monkeypatch, calls):
    """A counter that starts below zero never reaches its stage's task count: after
    PERSIST_SPINS polls the waiting task gives up, the step's logits are NaN and the launch
    ends."""
    from cospec import persistent

    monkeypatch.setattr(fused, "PERSIST_SPINS", 3)
    made = persistent.counters

    def short(layers_n, heads, device):
        c = made(layers_n, heads, device)
        c[persistent.STAGES + 1] = -1                    # layer 1's attention, one short
        return c

    monkeypatch.setattr(persistent, "counters", short)
    monkeypatch.setenv("COSPEC_FUSED", "1")
    lm = fast.StaticLM(odd_model(False), max_len=32)
    with torch.inference_mode():
        lm.forward([3, 4, 5, 6], keep=1)
        logits, _ = lm.forward([7], keep=1)
    assert len(calls) == 1 and torch.isnan(logits).all()


def test_settings():
    """PERSISTENT is a tunable setting, off by default; its tiles are powers of two, a wait's
    polls at least one."""
    assert fused.PERSISTENT == 0 and "PERSISTENT" in fused.TUNABLE
    with pytest.raises(CospecError, match="power of two"):
        fused.configure(["PERSIST_UP_BLOCK_N=6"])
    with pytest.raises(CospecError, match="PERSIST_SPINS is at least 1"):
        fused.configure(["PERSIST_SPINS=0"])
    assert fused.PERSIST_SPINS == 1 << 16


@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a GPU (compiled kernels)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_sm", [0, 1])
def test_cuda_graphs(monkeypatch, calls, dtype, per_sm):
    """On a GPU: the launch's programs side by side (as many as fit, or one an SM) inside
    captured CUDA graphs. float32 logits are transformers' to 1e-4, bfloat16 argmax-equal
    on most rows; replays are bit-identical (each task sums in a fixed order)."""
    from test_fused import cuda_agreement

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(fused, "PERSIST_PER_SM", per_sm)
    monkeypatch.setenv("COSPEC_FUSED", "1")
    model = tiny_model(14, width=128).to("cuda", dtype)  # head_dim 32
    ids = torch.randint(2, 96, (60,), generator=torch.Generator().manual_seed(6)).tolist()
    lm, ref = fast.StaticLM(model, max_len=128), CachedLM(model)
    assert cuda_agreement(lm, ref, ids, 24, dtype) >= 0.9
    assert calls and lm.engine.graphs
    again = [lm.engine.run([5], lm.length)[0].clone() for _ in range(2)]
    assert torch.equal(*again)
