"""Int8 copies of a CPU draft's linears (``cospec.cpu_int8``, ``--draft-weights int8``): the
kernel's products, which forwards read them (few rows, the draft only), and speculative
decoding with such a draft: greedy output equal to the target's own greedy decoding, samples
following the target's exact joint over whole blocks."""

from __future__ import annotations

import pytest
import torch
from distribution import assert_follows
from distribution import exact_joint as joint_of
from test_decoding import hf_greedy
from test_exactness import ALPHA, CFG, NEW, PROMPT, SAMPLES, VOCAB, ToyLM, truncate

import cospec
from cospec import cpu_int8
from cospec.cpu import fast_linear
from cospec.errors import CospecError
from cospec.methods import build_method
from cospec.models import Pair

pytestmark = pytest.mark.skipif(not cpu_int8.available(), reason="torch lacks the int8 kernel")
CPU = torch.device("cpu")


def test_quantize_keeps_each_weight_within_its_rows_scale():
    """w ~ q * s: every weight within one scale step of its row's, q in [-127, 127], the
    largest weight of a row at +-127 (or next to it, the scale rounded to bfloat16)."""
    w = torch.randn(40, 24) * torch.linspace(0.01, 3, 40)[:, None]
    q, s = cpu_int8.quantize(w)
    assert q.dtype == torch.int8 and s.dtype == cpu_int8.SCALE_DTYPE and s.shape == (40,)
    step = s.float()[:, None]
    assert ((q.float() * step - w).abs() <= step).all()
    assert (q.abs().amax(1) >= 126).all() and q.abs().max() <= 127


@pytest.mark.parametrize("n, k", [(300, 32), (7, 16), (64, 48), (33, 80)])
@pytest.mark.parametrize("rows", [1, 3, 8, 12])
def test_product_is_the_dequantized_weights(n, k, rows):
    """``product`` = x (in bfloat16) @ (q * s).T + bias, to bfloat16's rounding of the
    output, over [..., k] inputs of one and several rows."""
    w, b = torch.randn(n, k), torch.randn(n)
    q, s = cpu_int8.quantize(w)
    x = torch.randn(1, rows, k)
    ref = x.to(torch.bfloat16).float() @ (q.float() * s.float()[:, None]).T + b
    got = cpu_int8.product(x, (q, s, b))
    assert got.shape == (1, rows, n) and got.dtype == x.dtype
    assert (got - ref).abs().max() <= 1e-2 * ref.abs().max()


def test_widths_the_kernel_cannot_take_keep_their_weights():
    """Only linears whose input width is a multiple of 16 get copies (the kernel crashes or
    gives wrong products on others: 8 and 24 on AVX-512); a model with none is refused with
    a clear error."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 24), torch.nn.Linear(24, 16),
                                torch.nn.Linear(16, 8))
    assert cpu_int8.int8_weights(model) == 1
    assert list(cpu_int8._COPIES[model]) == [model[2]]
    with pytest.raises(CospecError, match="input width divisible by 16"):
        cpu_int8.int8_weights(torch.nn.Sequential(torch.nn.Linear(24, 5)))


def test_steps_read_the_copies_and_prefill_does_not(tiny_dirs):
    """Inside ``fast_linear`` a draft with copies reads them in its steps, however many rows
    (logits near its own, not equal), its own weights in a prefill (equal to the bit), and
    every linear is itself again after the block; the target, without copies, is
    untouched."""
    pair = cospec.load_pair(str(tiny_dirs[0]), str(tiny_dirs[1]), "cpu").models
    ids = torch.arange(3, 3 + 12)[None]

    def logits(model, x, prefill=False):
        with torch.inference_mode(), fast_linear(model, CPU, *x.shape, prefill=prefill):
            return model(x).logits

    own = {n: logits(pair.draft, ids[:, :n]) for n in (1, 12)}
    wide = ids.view(12, 1)
    own_wide = logits(pair.draft, wide)
    target = logits(pair.target, ids[:, :1])
    cpu_int8.int8_weights(pair.draft)
    for got, want in ((logits(pair.draft, ids[:, :1]), own[1]),  # one row
                      (logits(pair.draft, ids), own[12]),  # 12 tokens of one sequence
                      (logits(pair.draft, wide), own_wide)):  # a step of 12 sequences
        assert not torch.equal(got, want)
        assert (got - want).abs().max() < 0.05 * want.abs().max()
    assert torch.equal(logits(pair.draft, ids, prefill=True), own[12])  # its own weights
    assert all("forward" not in m.__dict__ for m in pair.draft.modules())
    assert torch.equal(logits(pair.target, ids[:, :1]), target)


def test_the_batched_decoder_reads_the_int8_draft_as_batch_one_does(tiny_dirs):
    """The batched lockstep decoder with an int8 draft gives each prompt the tokens the
    batch-1 loop gives it, at a batch of 12 (more rows a step than the kernel is fastest
    at) and of 3: the draft alone, and CoSpec keeping the draft's token at every mismatch.
    The int8 draft's tokens are not its own weights' (so a batch that fell back to them
    would show)."""
    from test_cospec import ConstantPolicy, loop, prompts

    from cospec.acceptance import ExactRule
    from cospec.arbiter import ArbiterRule
    from cospec.batched import lockstep

    pair = cospec.load_pair(str(tiny_dirs[0]), str(tiny_dirs[1]), "cpu").models
    ps = prompts(12)
    own = [loop(pair.draft, None, ids, ExactRule(), 1, 20) for ids in ps]
    cpu_int8.int8_weights(pair.draft)
    drafted = [loop(pair.draft, None, ids, ExactRule(), 1, 20) for ids in ps]
    assert drafted != own
    kept = [loop(pair.target, pair.draft, ids, ArbiterRule(ConstantPolicy(1.0)), 3, 20)
            for ids in ps]
    for batch in (12, 3):
        got = lockstep(pair.draft, None, ps, max_new_tokens=20, eos_ids=[1], pad_id=0,
                       batch_size=batch)
        assert [r.tokens for r in got] == drafted
        got = lockstep(pair.target, pair.draft, ps, max_new_tokens=20, eos_ids=[1], pad_id=0,
                       batch_size=batch, policy=ConstantPolicy(1.0))
        assert [r.tokens for r in got] == kept


def test_greedy_spd_with_an_int8_draft_is_the_targets_greedy_decoding(tiny_dirs, monkeypatch):
    """``load_pair(..., draft_weights="int8")`` on a CPU: spd's draft steps read the int8
    copies, and its tokens are the target's own greedy ones (transformers' ``generate``, no
    cospec in it)."""
    from cospec.sampling import GREEDY

    pair = cospec.load_pair(str(tiny_dirs[0]), str(tiny_dirs[1]), "cpu", draft_weights="int8")
    models = pair.models
    assert cpu_int8.has_copies(models.draft) and not cpu_int8.has_copies(models.target)
    calls = []
    product = cpu_int8.product
    monkeypatch.setattr(cpu_int8, "product", lambda x, c: calls.append(1) or product(x, c))
    spd = build_method("spd", models)
    for start in (3, 40, 90, 150):
        prompt = list(range(start, start + 6))
        got, _, stats = spd.run(prompt, k=4, max_new_tokens=24, sampling=GREEDY, eos_ids=[])
        assert got == hf_greedy(models.target, prompt, 24)
        assert stats.drafted > 0
    assert calls


class LinearToyLM(ToyLM):
    """``test_exactness.ToyLM`` of width 16 with its recurrence and output as ``nn.Linear``
    modules (the same random weights), so that ``cospec.cpu_int8`` can give it copies."""

    def __init__(self, seed: int):
        super().__init__(seed, width=16)
        self.rec_linear = linear(self.rec.T)
        self.out_linear = linear(self.out.T)

    def recur(self, h: torch.Tensor) -> torch.Tensor:
        return self.rec_linear(h[None])[0]

    def head(self, states: torch.Tensor) -> torch.Tensor:
        return self.out_linear(states)


def linear(w: torch.Tensor) -> torch.nn.Linear:
    """An ``nn.Linear`` (no bias) computing x @ w.T, of w's shape [out, in] and dtype."""
    mod = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
    with torch.no_grad():
        mod.weight.copy_(w)
    return mod


def test_sampled_spd_with_an_int8_draft_follows_the_targets_joint():
    """Sampled spd (k = 4, temperature, top-k and top-p on) with a draft whose steps read
    int8 copies: N generations of four tokens against the target's exact joint and each
    position's marginal (chi-square), as ``test_exactness`` does for the float draft."""
    target, draft = LinearToyLM(2), LinearToyLM(1)
    cpu_int8.int8_weights(draft)
    x = torch.tensor([PROMPT])
    with torch.inference_mode():
        own = draft(x[:, :1]).logits[0, -1]
        with fast_linear(draft, CPU, 1, 1):
            copied = draft(x[:, :1]).logits[0, -1]
    assert not torch.equal(copied, own) and own.shape == (VOCAB,)  # the copies are read
    probs = joint_of(lambda ids: truncate((target(ids).logits[0, -1] / CFG.temperature)
                                          .softmax(-1), CFG), PROMPT, NEW)
    run = build_method("spd", Pair(target, draft, None, "toy-target", "toy-draft"),
                       sampling=CFG)
    assert_follows((run.run(PROMPT, k=4, max_new_tokens=NEW, sampling=CFG, eos_ids=[],
                            seed=seed)[0] for seed in range(SAMPLES)), probs, NEW, ALPHA)


