"""CoS: exact speculative decoding of a *combination* of models (ICML 2025, 2502.01662).

Collaborative decoding samples each token from a combination r of several models:

- weighted ensemble (WE): r = sum_i lambda_i p_i, on (temperature-scaled) probabilities;
- contrastive decoding (CD): r = softmax((l_large - mu * l_small) / T), on logits.

Run naively (``we`` / ``cd``) every token costs a forward pass of every model. With
speculation the first model (the *proposer*, the smallest) drafts gamma tokens from its own
distribution q; every other model scores them in one pass; d_i is accepted with
probability min(1, r_i(d_i) / q_i(d_i)), else a token is drawn from norm(max(0, r_i - q_i)).
That is exact sampling from r (rejection sampling with q as the proposal).

- ``*-sd``: when all drafts pass, the bonus token needs r at the next position, hence the
  proposer's distribution there: the proposer runs one more (lookahead) step.
- ``cos-*`` (**alternate proposal**): when all drafts pass, the last verifier's own bonus
  token x ~ p is not committed but *proposed*; the proposer scores it in its next pass —
  the pass it needs anyway to draft again — and x is accepted with probability
  min(1, r(x) / p(x)), else replaced by a draw from norm(max(0, r - p)). The verifiers
  already computed their rows at x's position, so nothing is scored twice.

At T = 0 every "accept with probability" becomes "accept iff the token is argmax r", and
every resample becomes argmax r: the output equals greedy collaborative decoding.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from cospec.decoding import CachedLM, Token, _clock, cache_room, cached_lm
from cospec.errors import CospecError
from cospec.replay import CosTrace
from cospec.sampling import (
    GREEDY,
    SamplingConfig,
    first_rejection,
    probabilities,
    recover,
    rejection_test,
    sample,
)
from cospec.stats import DecodeStats

COS_METHODS = ("we", "cd", "we-sd", "cd-sd", "cos-we", "cos-cd")


@dataclass(frozen=True)
class Combination:
    """How r combines the models' logits, listed proposer (smallest) first.

    ``kind="we"``: weights (one per model, summing to 1). ``kind="cd"``: exactly two models,
    r from l_large - mu * l_small (the proposer is the "amateur").
    """

    kind: str
    weights: tuple[float, ...] = ()
    mu: float = 0.1

    def __post_init__(self):
        if self.kind not in ("we", "cd"):
            raise CospecError(f"unknown combination {self.kind!r} (we or cd)")
        if self.kind == "we" and (abs(sum(self.weights) - 1) > 1e-6
                                  or any(w < 0 for w in self.weights)):
            raise CospecError(f"ensemble weights must be >= 0 and sum to 1: {self.weights}")

    def probs(self, logits: list[torch.Tensor], cfg: SamplingConfig) -> torch.Tensor:
        """r [..., V] from per-model logits [..., V] (proposer first). Greedy configs give
        the one-hot of argmax r; otherwise top-k / top-p are applied to r itself."""
        if self.kind == "cd":
            if len(logits) != 2:
                raise CospecError("contrastive decoding combines exactly two models")
            return probabilities(logits[1].float() - self.mu * logits[0].float(), cfg)
        if len(logits) != len(self.weights):
            raise CospecError(f"{len(logits)} models but {len(self.weights)} weights")
        temp = 1.0 if cfg.greedy else cfg.temperature
        r = sum(w * (lg.float() / temp).softmax(-1) for w, lg in zip(self.weights, logits))
        if cfg.greedy:
            return torch.nn.functional.one_hot(r.argmax(-1), r.shape[-1]).float()
        if cfg.top_k or cfg.top_p < 1.0:  # filter r with the same rules, via log r
            return probabilities(r.clamp_min(1e-30).log(), SamplingConfig(1.0, cfg.top_p,
                                                                           cfg.top_k))
        return r


def _pick(probs: torch.Tensor, cfg: SamplingConfig, gen) -> int:
    return int(probs.argmax()) if cfg.greedy else sample(probs, gen)


def _verify(target: torch.Tensor, proposal: torch.Tensor, tokens: list[int],
            cfg: SamplingConfig, gen, trace: CosTrace) -> tuple[int, int | None]:
    """Test k proposed ``tokens`` at once on the device: (kept n, the token after them;
    None when all pass and ``target`` has no bonus row), read back in one host sync.
    ``target`` [m, V] (m = k or k + 1) is r at each position (row k: where a bonus is
    drawn), ``proposal`` [k, V] what the tokens were drawn from.
    Sampled: rejection sampling (``sampling.rejection_test``, ``sampling.recover``);
    greedy: a token passes iff it is argmax r, and the next token is argmax r. ``trace``
    sees each outcome up to the first rejection; where a replay decides otherwise, the
    token after the replayed n is drawn for that position (a second sync, replay only)."""
    k = len(tokens)
    ids = torch.tensor(tokens, dtype=torch.long, device=target.device)
    if cfg.greedy:
        passes = target[:k].gather(-1, ids.view(k, 1))[:, 0] > 0.5
    else:
        passes = rejection_test(target, proposal, ids, gen)
    real = first_rejection(passes)

    def after(at: torch.Tensor) -> torch.Tensor:
        if cfg.greedy:
            return target.index_select(0, at).argmax(-1)
        return recover(target, proposal, at, gen)

    out = torch.cat([passes.long(), real, after(real.clamp_max(len(target) - 1))]).tolist()
    n = next((i for i, ok in enumerate(out[:k]) if not trace.decide(bool(ok))), k)
    if n == len(target):
        return n, None
    if n == out[k]:
        return n, out[k + 1]
    return n, int(after(torch.tensor([n], device=target.device))[0])


def _next_row(lm: CachedLM, seq: list[int]) -> torch.Tensor:
    """lm's logits [V] for the token after ``seq`` (its cache may already cover all of
    ``seq``: it is cut back to keep the last token as input)."""
    lm.crop(min(lm.length, len(seq) - 1))
    return lm.forward(seq[lm.length:], keep=1)[0][0]


def _plain_step(lms: list[CachedLM], seq: list[int], combo: Combination,
                sampling: SamplingConfig, gen) -> int:
    """One token of plain collaborative decoding: every model scores the next position."""
    return _pick(combo.probs([_next_row(lm, seq) for lm in lms], sampling), sampling, gen)


@torch.inference_mode()
def cos_generate(models: list[torch.nn.Module], prompt_ids: list[int], combo: Combination,
                 method: str, *, gamma: int = 5, max_new_tokens: int = 128,
                 sampling: SamplingConfig = GREEDY, eos_ids: Iterable[int] = (),
                 seed: int | None = None, stats: DecodeStats | None = None,
                 trace: CosTrace | None = None) -> Iterator[Token]:
    """Yield tokens sampled (exactly) from the combination r of ``models``.

    ``models[0]`` proposes (``*-sd``, ``cos-*``); ``method`` in COS_METHODS.
    ``stats.steps`` counts passes of the verifiers; ``accepted`` counts committed proposals.
    ``trace`` records (or replays) every accept/reject outcome (``cospec.replay``).
    Inference mode holds while the loop runs, not between yields.
    """
    if method not in COS_METHODS:
        raise CospecError(f"unknown combination method {method!r}; choose from "
                          f"{', '.join(COS_METHODS)}")
    if not prompt_ids:
        raise CospecError("empty prompt: give at least one token")
    if gamma < 1:
        raise CospecError(f"gamma must be >= 1, got {gamma}")
    stats = stats if stats is not None else DecodeStats()
    eos = set(eos_ids)
    lms = [cached_lm(m, False, cache_room(prompt_ids, max_new_tokens, gamma)) for m in models]
    proposer, verifiers = lms[0], lms[1:]
    gen = torch.Generator(device=proposer.device).manual_seed(seed) if seed is not None else None
    seq, out = list(prompt_ids), 0
    pending = None  # cos: (token, its proposal probs, verifier rows at its position)
    speculative = method != combo.kind
    trace = trace if trace is not None else CosTrace()
    t0 = _clock(proposer.device)
    for lm in lms:
        lm.prefill(seq[:-1])
    stats.prefill_s += _clock(proposer.device) - t0
    while out < max_new_tokens:
        t0 = _clock(proposer.device)
        new: list[int] = []
        from_draft: list[bool] = []
        first = None  # proposer row for the next draft, when already computed
        if not speculative:  # every model scores every token
            new.append(_plain_step(lms, seq, combo, sampling, gen))
            from_draft.append(False)
            stats.record_step(0, 0)
        else:
            if pending is not None:  # the proposer scores the large model's proposal
                x, p_x, rows_x = pending
                pending = None
                two = proposer.forward(seq[proposer.length:] + [x], keep=2)[0]
                r = combo.probs([two[0], *rows_x], sampling)
                stats.drafted += 1
                kept, recovered = _verify(r[None], p_x[None], [x], sampling, gen, trace)
                if kept:
                    new.append(x)
                    first = two[1]
                    stats.accepted += 1
                else:
                    proposer.crop(len(seq))
                    new.append(recovered)
                from_draft.append(bool(kept))  # a recovered token is no proposal's
                seq.extend(new)
            n = min(gamma, max(max_new_tokens - out - len(new) - 1, 0))
            if n:
                drafts, q_rows = [], []
                row = first if first is not None else _next_row(proposer, seq)
                for i in range(n):
                    q_rows.append(row)
                    drafts.append(_pick(probabilities(row, sampling), sampling, gen))
                    if i < n - 1 or method.endswith("-sd"):  # -sd: lookahead row too
                        row = proposer.forward([drafts[-1]], keep=1)[0][0]
                v_rows = [v.forward(seq[v.length:] + drafts, keep=n + 1)[0]
                          for v in verifiers]
                base = len(seq)
                # r at every draft position, and where a bonus is drawn: r after the
                # block (-sd, with the proposer's lookahead row) or the last verifier's
                # own p (cos: its bonus is proposed, see ``pending``)
                sd = method.endswith("-sd")
                q_logits = torch.stack(q_rows + [row] if sd else q_rows)  # [n (+ 1), V]
                r = combo.probs([q_logits, *(v[:len(q_logits)] for v in v_rows)], sampling)
                if not sd:
                    r = torch.cat([r, probabilities(v_rows[-1][n:], sampling)])
                q = probabilities(q_logits[:n], sampling)
                kept, tail = _verify(r, q, drafts, sampling, gen, trace)
                stats.record_step(n, kept)
                new_part = drafts[:kept]
                if kept == n and not sd:  # all passed: the last verifier proposes its bonus
                    pending = (tail, r[n], [v[n] for v in v_rows])
                    tail = None
                for lm in lms:
                    lm.crop(min(lm.length, base + kept))
                new_part += [tail] if tail is not None else []
                seq.extend(new_part)
                new += new_part
                from_draft += [True] * kept + ([False] if tail is not None else [])
            elif pending is None and not new:  # one token left: no room to speculate
                new.append(_plain_step(lms, seq, combo, sampling, gen))
                from_draft.append(False)
                seq.extend(new)
                stats.record_step(0, 0)
        if not speculative:
            seq.extend(new)
        cut = next((j + 1 for j, tok in enumerate(new) if tok in eos), len(new))
        cut = min(cut, max_new_tokens - out)
        stats.generated += cut
        stats.decode_s += _clock(proposer.device) - t0
        for j in range(cut):
            yield Token(new[j], from_draft[j])
        out += cut
        if cut < len(new) or (cut and new[cut - 1] in eos):
            return
