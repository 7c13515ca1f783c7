"""The batch engine's forwards through the fused layers (``batch_lm.BatchLM``): a lone
request in slot 0 decodes on ``cospec.fused``'s kernels, and so does a step of 2..16 rows of
n tokens each (b * n <= 16: a decode step, a verify, a catch-up), each row on its own cache;
more tokens run on the reference.

As ``test_fused.py``, these run under triton's interpreter on CPU tensors
(TRITON_INTERPRET=1 in the environment at start).
"""

import pytest
import torch
from test_fused import ATOL, INTERPRETED, RTOL
from tiny import tiny_model

from cospec import fused
from cospec.batch_lm import BatchLM
from cospec.cos import Combination
from cospec.fast_batch import generate_batch
from cospec.sampling import SamplingConfig


@pytest.fixture(autouse=True)
def two_splits(monkeypatch):
    """Two attention splits: the interpreter's time grows with splits x heads."""
    monkeypatch.setattr(fused, "SPLITS", 2)


@pytest.fixture
def fused_calls(monkeypatch) -> list[int]:
    """The rows of every fused attention call (``fused.attention_mlp``), recorded."""
    calls, attention = [], fused.attention_mlp

    def counted(x, *args, **kw):
        calls.append(len(x))
        return attention(x, *args, **kw)

    monkeypatch.setattr(fused, "attention_mlp", counted)
    return calls


def test_one_row_logits_match_the_reference(interpret, fused_calls):
    """Slot 0's steps (1 token, a 2-token catch-up, a 5-token verify) through the fused
    layers give the reference forward's logits and hidden states to 1e-5, over a cache
    whose slots beyond each position hold stale entries; two rows of 33 tokens (66 >
    ROWS_TOKENS) stay on the reference."""
    model = tiny_model(31, dtype=torch.float32)
    lms = [BatchLM(model, rows=2, max_len=64, graphs=False, compile=False, fused=flag)
           for flag in (True, False)]
    assert [lm.fused for lm in lms] == [True, False]
    prompt = torch.randint(2, 96, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    for lm in lms:
        lm.prefill([prompt, prompt[:9]], [0, 1])
        lm.run(torch.tensor([[5] * 6]), torch.arange(30, 36)[None])  # stale slots 30..35
    for start, n in ((20, 1), (21, 2), (22, 5), (24, 1)):
        ids = torch.randint(2, 96, (1, n), generator=torch.Generator().manual_seed(start))
        pos = torch.arange(start, start + n)[None]
        (a, ha), (b, hb) = (lm.run(ids, pos) for lm in lms)
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(ha, hb, atol=ATOL, rtol=RTOL)
    assert fused_calls == [n for n in (6, 1, 2, 5, 1) for _ in range(2)]  # 2 layers each
    fused_calls.clear()
    assert fused.ROWS_TOKENS < 2 * 33
    ids = torch.randint(2, 96, (2, 33), generator=torch.Generator().manual_seed(3))
    pos = torch.stack([torch.arange(25, 58), torch.arange(9, 42)])
    (a, _), (b, _) = (lm.run(ids, pos) for lm in lms)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    assert fused_calls == []


@pytest.mark.parametrize(("rows", "tokens"), [(2, 1), (5, 1), (3, 4), (4, 5), (7, 5), (20, 1)])
def test_decode_rows_each_on_their_own_cache(interpret, fused_calls, rows, tokens):
    """A step of several rows (``tokens`` each: a decode step, or a verify of 4 or 5; every
    row at its own position, its cache holding other rows' prompts and stale slots) through
    the fused layers gives the reference forward's logits and hidden states to 1e-5, step
    after step; the caches they write agree too. 4 and 7 rows of 5 tokens run in row blocks
    of 32 and 64, 20 decode rows more than the one-row engine's MAX_ROWS (the final norm
    then unfused)."""
    assert rows * tokens <= fused.ROWS_TOKENS
    model = tiny_model(32, dtype=torch.float32)
    lms = [BatchLM(model, rows=max(8, rows), max_len=64, graphs=False, compile=False, fused=flag)
           for flag in (True, False)]
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(2, 96, (n,), generator=g).tolist()
               for n in [20, 7, 13, 3, 30, 9, 16] * 3][:rows]
    for lm in lms:
        lm.prefill(prompts, list(range(rows)))
        lm.run(torch.full((rows, 4), 5), torch.arange(40, 44).expand(rows, 4))  # stale
    fused_calls.clear()
    pos = torch.tensor([[len(p)] for p in prompts]) + torch.arange(tokens)
    for step in range(3):
        ids = torch.randint(2, 96, (rows, tokens), generator=g)
        (a, ha), (b, hb) = (lm.run(ids, pos + step * tokens) for lm in lms)
        assert a.shape == (rows, tokens, 96)
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(ha, hb, atol=ATOL, rtol=RTOL)
    for kf, kr in zip(lms[0].kc + lms[0].vc, lms[1].kc + lms[1].vc):
        torch.testing.assert_close(kf[:rows, :, :33 + 3 * tokens],
                                   kr[:rows, :, :33 + 3 * tokens], atol=ATOL, rtol=RTOL)
    assert fused_calls == [rows * tokens] * (2 * 3)  # 2 layers, 3 steps


def test_decode_rows_setting(interpret, monkeypatch, fused_calls):
    monkeypatch.setenv("COSPEC_FUSED_ROWS", "0")
    lm = BatchLM(tiny_model(32, dtype=torch.float32), rows=2, max_len=32, graphs=False,
                 compile=False, fused=True)
    lm.prefill([[3, 4, 5], [6, 7]], [0, 1])
    lm.run(torch.tensor([[8], [9]]), torch.tensor([[3], [2]]))
    assert lm.fused and not lm.fused_rows and fused_calls == []


@pytest.mark.parametrize("method", ["target", "spd"])
def test_lone_request_tokens(interpret, monkeypatch, fused_calls, method):
    """A lone request (slot 0) decoded by the batch engine with the fused layers gives the
    reference engine's tokens, greedy and sampled (seeded), target-only and speculative;
    two requests too: two rows on the reference until the first ends, then the second,
    moved down to slot 0, on the fused layers."""
    target = tiny_model(11, dtype=torch.float32)
    draft = tiny_model(12, layers=1, dtype=torch.float32) if method == "spd" else None
    prompts = [[5, 17, 33, 2, 60, 41], [9, 3, 70, 12]]
    sampled = SamplingConfig(temperature=1.0)

    def run(flag: str, many: bool, sampling=None) -> list[list[int]]:
        monkeypatch.setenv("COSPEC_FUSED", flag)
        return generate_batch(target, draft, prompts if many else prompts[:1], k=3,
                              max_new_tokens=[3, 10] if many else [10], graphs=False,
                              **({"sampling": sampling} if sampling else {}))

    for many in (False, True):
        for sampling in (None, sampled):
            want = run("0", many, sampling)
            fused_calls.clear()
            assert run("1", many, sampling) == want and len(want[-1]) == 10
            assert fused_calls


def test_rows_of_cos_blocks(interpret, monkeypatch, fused_calls):
    """Three requests of CoS (cos-we: a weighted ensemble, alternate proposals, k = 3) decoded
    together through the fused rows (three rows of up to four tokens a step) give the
    reference engine's tokens."""
    target = tiny_model(13, dtype=torch.float32)
    draft = tiny_model(14, layers=1, dtype=torch.float32)
    prompts = [[5, 17, 33, 2, 60, 41], [9, 3, 70, 12], [44, 8, 19, 27, 3]]

    def run(flag: str) -> list[list[int]]:
        monkeypatch.setenv("COSPEC_FUSED", flag)
        return generate_batch(target, draft, prompts, k=3, max_new_tokens=[8, 6, 8],
                              graphs=False, combo=Combination("we", (0.5, 0.5)),
                              alternate=True)

    want = run("0")
    fused_calls.clear()
    assert run("1") == want and [len(t) for t in want] == [8, 6, 8]
    assert max(fused_calls) >= 8  # steps of several rows of several tokens took them


@pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(),
                    reason="needs a CUDA GPU and compiled triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs(monkeypatch, fused_calls, dtype):
    """On a GPU, in CUDA graphs: slot 0's one-row forwards through the fused layers against
    the reference engine's (float32 to 1e-4, bfloat16 argmax-equal on most rows), and in
    float32 a lone request's target-only and speculative tokens equal."""
    target = tiny_model(14, width=128).to("cuda", dtype)  # head_dim 32
    lms = [BatchLM(target, rows=2, max_len=64, fused=flag) for flag in (True, False)]
    assert [lm.fused for lm in lms] == [True, False] and lms[0].use_graphs
    prompt = torch.randint(2, 96, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    agree = rows = 0
    with torch.inference_mode():
        for lm in lms:
            lm.prefill([prompt], [0])
        for start, n in ((20, 1), (21, 2), (22, 5), (24, 1), (25, 6)):
            ids = torch.randint(2, 96, (1, n), generator=torch.Generator().manual_seed(start))
            ids, pos = ids.cuda(), torch.arange(start, start + n, device="cuda")[None]
            a, b = (lm.run(ids, pos)[0].float().clone() for lm in lms)
            if dtype == torch.float32:
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            rows += n
    assert fused_calls and agree >= 0.9 * rows
    if dtype == torch.float32:
        draft = tiny_model(15, width=128, layers=1).to("cuda", dtype)
        for proposer in (None, draft):
            got = []
            for flag in ("0", "1"):
                monkeypatch.setenv("COSPEC_FUSED", flag)
                got.append(generate_batch(target, proposer, [prompt[:6]], k=3,
                                          max_new_tokens=24)[0])
            assert got[0] == got[1] and len(got[0]) == 24


@pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(),
                    reason="needs a CUDA GPU and compiled triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [4, 24])
def test_cuda_decode_rows(monkeypatch, fused_calls, dtype, rows):
    """On a GPU, in CUDA graphs: decode steps and verifies of four rows (4 tokens) and of 24
    (2 tokens: more rows than the one-row engine's MAX_ROWS, 48 tokens under the cap of 64),
    each on its own cache, through the fused layers against the reference engine's (float32
    to 1e-4, bfloat16 argmax-equal on most rows), and in float32 the requests' target-only
    and speculative tokens equal."""
    verify = min(4, fused.ROWS_TOKENS // rows)
    assert verify >= 2
    target = tiny_model(16, width=128).to("cuda", dtype)  # head_dim 32
    lms = [BatchLM(target, rows=rows, max_len=64, fused=flag) for flag in (True, False)]
    assert [lm.fused_rows for lm in lms] == [True, False] and lms[0].use_graphs
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 96, (n,), generator=g).tolist()
               for n in [20, 7, 13, 3] * (rows // 4)]
    pos = torch.tensor([[len(p)] for p in prompts], device="cuda")
    schedule = (1, 1, verify, 1, verify)  # tokens a row, step by step
    agree = 0
    with torch.inference_mode():
        for lm in lms:
            lm.prefill(prompts, list(range(rows)))
        for tokens in schedule:
            ids = torch.randint(2, 96, (rows, tokens), generator=g).cuda()
            at = pos + torch.arange(tokens, device="cuda")
            a, b = (lm.run(ids, at)[0].float().clone() for lm in lms)
            pos += tokens
            if dtype == torch.float32:
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
    assert sorted(set(fused_calls)) == [rows, rows * verify]
    assert agree >= 0.9 * rows * sum(schedule)
    if dtype == torch.float32:
        draft = tiny_model(17, width=128, layers=1).to("cuda", dtype)
        for proposer in (None, draft):
            got = []
            for flag in ("0", "1"):
                monkeypatch.setenv("COSPEC_FUSED_ROWS", flag)
                got.append(generate_batch(target, proposer, [p[:6] for p in prompts], k=3,
                                          max_new_tokens=24))
            assert got[0] == got[1] and all(len(t) == 24 for t in got[0])

