"""Sampled speculative methods draw *exactly* the right distribution, over whole blocks.

For spd, lookup, spd-lookup and spd-staged (target p; the lookup's proposals a one-hot q;
spd-staged's the draft's own, drawn in steps that check the lookup's guesses), we-sd /
cos-we (r = lam q + (1 - lam) p) and cd-sd / cos-cd (r = softmax((l_p - mu l_q) / T)), with
temperature, top-k and top-p all on, the joint distribution of the first four generated
tokens is enumerated exactly on a toy vocabulary and compared with N generations through the
public entry point (``cospec.methods``), one seed each. k = 4 with four new tokens: the
first block drafts three (the loop keeps room for its bonus), so the four tokens cover
accepted drafts, recovered tokens at every draft position, the bonus (spd, *-sd) or the
alternate proposal (cos-*), and a second, shorter block.

The models are tiny recurrent LMs with the Hugging Face call interface (a KV cache that
``crop``s): a forward costs microseconds where a tiny transformer costs a millisecond, which
buys the samples a 4-token joint needs. Their next-token distribution depends on the whole
prefix, so a token conditioned on the wrong context shows up too.

Power: SAMPLES = 4000 per method; the joints have 90-270 cells (66-203 after pooling). At
ALPHA = 1e-4 the joint test detects, 9 times in 10, a deviation of chi-square distance
sum((p' - p)^2 / p) >= 0.02-0.03 (for an even spread, a TV of about 0.07); each position's
marginal (<= 5 cells) one of >= 0.0085 (TV <= 0.046). A sampled token outside the truncated
support fails at once.
"""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from distribution import assert_follows
from distribution import exact_joint as joint_of

from cospec.methods import MethodOptions, build_method
from cospec.models import Pair
from cospec.sampling import SamplingConfig

VOCAB = 8
NEW = 4                # tokens per generation: the joint has at most TOP_K ** NEW cells
K = 4                  # draft length asked for (the first block drafts NEW - 1 = 3)
CFG = SamplingConfig(temperature=0.9, top_p=0.9, top_k=5)
LAM, MU = 0.5, 0.5     # we: r = LAM q + (1 - LAM) p; cd: a strong contrast, so r is far from p
PROMPT = [2, 5, 3]
SAMPLES = 4000
ALPHA = 1e-4           # significance of each chi-square test (seeds are fixed: deterministic)
METHODS = ("spd", "lookup", "spd-lookup", "spd-staged", "we-sd", "cd-sd", "cos-we", "cos-cd")


class ToyCache:
    """The per-token recurrent states: ``crop`` and ``get_seq_length`` as a HF cache."""

    def __init__(self):
        self.states: list[torch.Tensor] = []

    def get_seq_length(self) -> int:
        return len(self.states)

    def crop(self, length: int) -> None:
        """Keep ``length`` tokens (negative: drop that many), as ``DynamicCache.crop``."""
        del self.states[length if length >= 0 else len(self.states) + length:]


class ToyLM(torch.nn.Module):
    """h_t = tanh(h_{t-1} R + E[x_t]); logits_t = h_t U. Float64, random fixed weights;
    ``sharp`` scales the logits (1.5: neither near-uniform nor near-deterministic)."""

    def __init__(self, seed: int, width: int = 8, sharp: float = 1.5):
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def weight(*shape: int, scale: float) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.randn(*shape, generator=g, dtype=torch.float64)
                                      * scale, requires_grad=False)

        self.emb = weight(VOCAB, width, scale=1.0)
        self.rec = weight(width, width, scale=1.5 / math.sqrt(width))
        self.out = weight(width, VOCAB, scale=sharp / math.sqrt(width))

    def forward(self, input_ids: torch.Tensor, past_key_values: ToyCache | None = None,
                use_cache: bool = True, logits_to_keep: int = 0) -> SimpleNamespace:
        """input_ids [1, n] -> logits [1, keep, V] (all n rows when keep is 0)."""
        cache = past_key_values if past_key_values is not None else ToyCache()
        h = cache.states[-1] if cache.states else torch.zeros_like(self.emb[0])
        ids = input_ids[0].tolist()
        for tok in ids:
            h = torch.tanh(self.recur(h) + self.emb[tok])
            cache.states.append(h)
        keep = min(logits_to_keep or len(ids), len(ids))
        logits = self.head(torch.stack(cache.states[-keep:]))
        return SimpleNamespace(logits=logits[None], past_key_values=cache)

    def recur(self, h: torch.Tensor) -> torch.Tensor:
        """h [width] -> h R."""
        return h @ self.rec

    def head(self, states: torch.Tensor) -> torch.Tensor:
        """states [n, width] -> logits [n, V]."""
        return states @ self.out


def truncate(r: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Reference top-k then top-p of a distribution [V] (float64, written apart from
    ``cospec.sampling``): keep the k likeliest, renormalise, keep the shortest head whose
    mass reaches top_p, renormalise."""
    r = r.clone()
    if cfg.top_k:
        r[r < r.sort(descending=True).values[cfg.top_k - 1]] = 0
        r = r / r.sum()
    order = r.argsort(descending=True)
    before = r[order].cumsum(0) - r[order]  # mass of the tokens likelier than each
    r[order[before >= cfg.top_p]] = 0
    return r / r.sum()


def combined(method: str, l_q: torch.Tensor, l_p: torch.Tensor) -> torch.Tensor:
    """The distribution [V] a method samples from, given the draft's and target's logits."""
    t = CFG.temperature
    if method in ("spd", "lookup", "spd-lookup", "spd-staged"):  # the target's own
        r = (l_p / t).softmax(-1)
    elif "we" in method.split("-"):
        r = LAM * (l_q / t).softmax(-1) + (1 - LAM) * (l_p / t).softmax(-1)
    else:
        r = ((l_p - MU * l_q) / t).softmax(-1)
    return truncate(r, CFG)


def exact_joint(method: str, draft: ToyLM, target: ToyLM) -> dict[tuple[int, ...], float]:
    """P(first NEW tokens) for every sequence of nonzero probability, by enumerating the
    prefixes with uncached forwards of both models."""
    return joint_of(lambda x: combined(method, draft(x).logits[0, -1], target(x).logits[0, -1]),
                    PROMPT, NEW)


@pytest.fixture(scope="module")
def pair() -> Pair:
    return Pair(ToyLM(1), ToyLM(2), None, "toy-target", "toy-draft")


def test_toy_models_have_power(pair):
    """The setting can tell right from wrong: the methods' joints are far apart; each has
    many cells, neither near-uniform nor near-certain (likeliest sequence 1-20 %); the
    draft is accepted at the first position neither always nor never."""
    joints = {m: exact_joint(m, pair.draft, pair.target) for m in ("spd", "we-sd", "cd-sd")}
    for a, b in itertools.combinations(joints.values(), 2):
        tv = 0.5 * sum(abs(a.get(c, 0) - b.get(c, 0)) for c in a.keys() | b.keys())
        assert tv > 0.1
    x = torch.tensor([PROMPT])
    with torch.inference_mode():
        l_q, l_p = pair.draft(x).logits[0, -1], pair.target(x).logits[0, -1]
    q = combined("spd", l_p, l_q)  # the draft's own processed distribution
    for method, joint in joints.items():
        assert 50 <= len(joint) <= CFG.top_k ** NEW and 0.01 < max(joint.values()) < 0.2
        assert 0.1 < torch.minimum(q, combined(method, l_q, l_p)).sum() < 0.9


@pytest.mark.parametrize("method", METHODS)
def test_block_samples_follow_the_exact_joint(pair, method):
    """N sampled generations (k = 4, top-k and top-p on) against the exact joint of the
    first four tokens, and each position's marginal: no token outside the truncated
    support, and chi-square p-values above ALPHA."""
    probs = exact_joint(method, pair.draft, pair.target)
    assert abs(sum(probs.values()) - 1) < 1e-9
    run = build_method(method, pair, MethodOptions(lam=LAM, mu=MU), CFG)
    assert_follows((run.run(PROMPT, k=K, max_new_tokens=NEW, sampling=CFG, eos_ids=[],
                            seed=seed)[0] for seed in range(SAMPLES)), probs, NEW, ALPHA)


def test_staged_proposals_are_the_drafts_own_chain(pair, monkeypatch):
    """``lookup.staged_propose``'s k = 4 proposals, with the lookup's guesses checked by the
    draft (kept with probability q(guess), else a draw from q without it), follow the joint
    of the draft's own four sampled tokens, on a prompt whose repeats make the lookup guess
    at every step; guesses both stand and get replaced."""
    from cospec import lookup
    from cospec.decoding import CachedLM

    prompt = [2, 5, 3, 2, 5, 3, 2, 5]
    t = CFG.temperature
    probs = joint_of(lambda x: truncate((pair.draft(x).logits[0, -1] / t).softmax(-1), CFG),
                     prompt, NEW)
    stood = replaced = 0
    real = lookup._stand_or_draw

    def counted(logits, guess, sampling, gen):
        nonlocal stood, replaced
        got = real(logits, guess, sampling, gen)  # the guesses that stood, then one drawn
        stood, replaced = stood + len(got) - 1, replaced + (len(got) - 1 < len(guess))
        return got

    monkeypatch.setattr(lookup, "_stand_or_draw", counted)

    def sample(seed: int) -> list[int]:
        lm, index = CachedLM(pair.draft), lookup.NgramIndex()
        lm.prefill(prompt[:-1])
        index.sync(prompt)
        gen = torch.Generator().manual_seed(seed)
        prop = lookup.staged_propose(lm, index, prompt, NEW, CFG, gen)
        assert lm.length == len(prompt) + NEW - 1  # the cache: all but the last token
        return prop.tokens

    assert_follows((sample(seed) for seed in range(SAMPLES)), probs, NEW, ALPHA)
    assert stood > SAMPLES // 4 and replaced > SAMPLES // 4
