"""Prompt lookup: speculative decoding whose proposals are copied from the sequence itself.

At each step the last n tokens (n = NGRAM down to 1) are looked up in everything before them
(prompt and output so far); the tokens that followed their most recent earlier occurrence
are the proposal, which the target verifies by the same rule as a draft's (``ExactRule``:
greedy output stays the target's; sampled output exact in distribution, the proposal's q a
one-hot). No draft model runs: a step where nothing matches is a plain target step. This is
transformers' ``prompt_lookup_num_tokens`` and vLLM's ``ngram`` speculation, in cospec's one
loop (``decoding.decode``).

Three methods:

- ``lookup``: the lookup alone (any target, no draft);
- ``spd-lookup``: the lookup where it proposes a whole block (as many tokens as the draft
  would), the draft's proposals otherwise. The draft's cache catches up on the tokens
  committed without it in its next step (``decoding.run_ahead`` feeds whatever its cache
  lacks). Offline, on an H200's step times, a whole block as the threshold bounded best
  (GSM8K 1.39x, HumanEval 2.16x against 1.38x / 2.06x at 2 tokens).
- ``spd-staged``: spd whose draft checks the lookup's guesses (staged speculation, the
  draft speculating on itself): the proposals are the draft's own, as spd's, so greedy
  verdicts and tokens are spd's, in fewer draft steps, each over a few rows. Offline, on
  an H200's step times, it bounded at 1.51x / 1.98x against spd's 1.32x / 1.47x
  (results/schedule-bound). Greedy on a GPU it runs as ``device_blocks.guessed_block``
  (``device_guesses``: the first draft step checks guesses, no host read, k + c proposals).

Offline, along the target's own greedy outputs of the shipped pair, the lookup proposed in
57-76 % of steps and those steps emitted 1.5-2.9 tokens (results/prompt-lookup-bound).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

from cospec.acceptance import AcceptanceRule, Proposal
from cospec.decoding import CachedLM, Speculation, Token, decode, propose, score
from cospec.errors import CospecError
from cospec.sampling import GREEDY, SamplingConfig, probabilities, sample_on_device
from cospec.stats import DecodeStats

LOOKUP_METHODS = ("lookup", "spd-lookup", "spd-staged")
NGRAM = 3        # the longest suffix looked up
STAGED_ROWS = 6  # rows of a staged draft step at most (the catch-up rows and the guesses)


class NgramIndex:
    """The most recent end of every n-gram (n = 1..ngram) of a growing sequence, so that a
    lookup costs O(ngram) however long the sequence. ``ends[g]`` is the latest position j
    with seq[j - n:j] == g; ``before[g]`` the one before it."""

    def __init__(self, ngram: int = NGRAM):
        if ngram < 1:
            raise CospecError(f"n-gram size must be >= 1, got {ngram}")
        self.ngram, self.seq = ngram, []
        self.ends: dict[tuple[int, ...], int] = {}
        self.before: dict[tuple[int, ...], int] = {}

    def sync(self, seq: list[int]) -> None:
        """Index the tokens ``seq`` has beyond those indexed (``seq`` only grows: it must
        start with what was indexed)."""
        self.extend(seq[len(self.seq):])

    def extend(self, tokens: Iterable[int]) -> None:
        """Index ``tokens`` as the sequence's next ones."""
        for tok in tokens:
            self.seq.append(tok)
            end = len(self.seq)
            for n in range(1, min(self.ngram, end) + 1):
                g = tuple(self.seq[end - n:end])
                if g in self.ends:
                    self.before[g] = self.ends[g]
                self.ends[g] = end

    def propose(self, k: int, extra: Sequence[int] = ()) -> list[int]:
        """Up to k tokens that followed the most recent earlier occurrence of the sequence's
        last n tokens, for the longest n <= ngram that occurred before; [] if none did. The
        sequence is the indexed one followed by ``extra`` (a few tokens not indexed: a
        block's drafted ones), whose own n-grams are found by a scan."""
        seq, base = self.seq, len(self.seq)
        end = base + len(extra)

        def at(i: int) -> int:
            return seq[i] if i < base else extra[i - base]

        if k < 1:
            return []
        for n in range(min(self.ngram, end - 1), 0, -1):
            g = tuple(at(i) for i in range(end - n, end))
            found = next((e for e in range(end - 1, max(base, n - 1), -1)  # ends past base
                          if all(at(e - n + t) == g[t] for t in range(n))), None)
            if found is None:
                found = self.ends.get(g)
                if found == end:  # the suffix itself: its earlier occurrence
                    found = self.before.get(g)
            if found is not None:
                return [at(i) for i in range(found, min(found + k, end))]
        return []


def device_guesses(seq: torch.Tensor, length: torch.Tensor, m: int, ngram: int = NGRAM
                   ) -> torch.Tensor:
    """``NgramIndex.propose(m)`` of seq[:length] on the device, in static shapes (for a CUDA
    graph): seq [room] long, length [1] long. Returns [m] long, the tokens that followed the
    latest earlier occurrence of the longest suffix of n <= ngram tokens seen before, -1
    past their end (or everywhere when no suffix was seen before)."""
    pos = torch.arange(max(seq.numel(), m, ngram), device=seq.device)
    best = torch.full((1,), -1, dtype=torch.long, device=seq.device)
    for n in range(1, min(ngram, seq.numel()) + 1):  # a longer suffix's occurrence wins
        suffix = seq.index_select(0, (length - n + pos[:n]).clamp(min=0))    # [n]
        same = (seq.unfold(0, n, 1) == suffix).all(-1)                        # [room - n + 1]
        end = pos[:same.numel()] + n  # an occurrence ending before the suffix's last token
        ok = same & (end <= length - 1) & (length > n)
        found = torch.where(ok, end, -1).max().view(1)
        best = torch.where(found >= 0, found, best)
    at = best + pos[:m]
    ok = (best >= 0) & (at < length)
    return torch.where(ok, seq.index_select(0, at.clamp(0, seq.numel() - 1)), -1)


def staged_propose(lm: CachedLM, index: NgramIndex, seq: list[int], k: int,
                   sampling: SamplingConfig, gen: torch.Generator | None,
                   rows: int = STAGED_ROWS) -> Proposal:
    """The draft's k tokens after ``seq`` as ``decoding.propose`` draws them (greedy: the same
    tokens; sampled: the same distribution), in fewer draft steps: before each step the
    lookup guesses the tokens ahead (``index`` holds ``seq``; the block's drafted tokens are
    looked up too), and one forward over the tokens the cache lacks plus the guesses gives
    the draft's row at each guess. A guess stands where the draft would have drawn it: its
    argmax (greedy), or kept with probability q(guess) and else replaced by a draw from q
    with the guess taken out, which is a draw from q (speculative sampling against a one-hot
    proposal). The first replaced guess, or the row after the last kept one, gives the
    step's own token. A step feeds at most ``rows`` rows; the cache keeps the invariant
    (all of seq + tokens but the last)."""
    lm.crop(min(lm.length, len(seq) - 1))
    tokens: list[int] = []
    rows_out = []
    while len(tokens) < k:  # the tokens the cache lacks, without copying all of seq
        pending = seq[lm.length:] + tokens[max(lm.length - len(seq), 0):]
        room = min(k - len(tokens) - 1, rows - len(pending))
        guess = index.propose(room, tokens) if room > 0 else []
        logits, _ = lm.forward(pending + guess, keep=len(guess) + 1)  # [len(guess) + 1, V]
        drawn = _stand_or_draw(logits, guess, sampling, gen)
        tokens += drawn
        rows_out.append(logits[:len(drawn)])
        lm.crop(len(seq) + len(tokens) - 1)
    return Proposal(tokens, torch.cat(rows_out) if rows_out else None)


def _stand_or_draw(logits: torch.Tensor, guess: list[int], sampling: SamplingConfig,
                   gen: torch.Generator | None) -> list[int]:
    """The guesses that stand (their prefix), then the draft's own token: from the row of
    the first guess that does not stand, or from the last row. ``logits`` [len(guess) + 1,
    V]; one host read."""
    if sampling.greedy:
        own = logits.argmax(-1).tolist()
        kept = next((j for j, g in enumerate(guess) if own[j] != g), len(guess))
        return guess[:kept] + [own[kept]]
    q = probabilities(logits, sampling)  # [len(guess) + 1, V]
    n = len(guess)
    g = torch.tensor(guess, dtype=torch.long, device=q.device)
    u = torch.rand(n, generator=gen, device=q.device)
    stands = (u < q[torch.arange(n, device=q.device), g]).tolist()
    kept = next((j for j, ok in enumerate(stands) if not ok), n)
    row = q[kept]
    if kept < n:  # the guess taken out of q
        row = row.clone()
        row[guess[kept]] = 0.0
        row = row / row.sum()
    return guess[:kept] + sample_on_device(row, gen).tolist()


class Lookup(Speculation):
    """The target verifying prompt-lookup proposals; with a draft (``spd-lookup``) the draft
    proposes where the lookup offers less than a whole block; ``staged`` (``spd-staged``):
    the draft proposes every block, checking the lookup's guesses (``staged_propose``)."""

    def __init__(self, verifier: torch.nn.Module, proposer: torch.nn.Module | None,
                 ngram: int = NGRAM, staged: bool = False):
        if staged and proposer is None:
            raise CospecError("staged proposals need a draft model")
        super().__init__(verifier, proposer)
        self.index, self.drafting, self.staged = NgramIndex(ngram), proposer is not None, staged

    def start(self, room: int) -> list[CachedLM]:
        lms = super().start(room)
        if not self.drafting:  # a second cache makes ``decode`` speculate, not run plain
            self.draft = _NoCache(self.target.device)
            lms.append(self.draft)
        return lms

    def propose(self, seq: list[int], n: int, sampling: SamplingConfig,
                gen: torch.Generator | None) -> Proposal:
        self.index.sync(seq)
        if self.staged:
            return staged_propose(self.draft, self.index, seq, n, sampling, gen)
        tokens = self.index.propose(n)
        if self.drafting and len(tokens) < n:
            return propose(self.draft, seq, n, sampling, gen)
        return Proposal(tokens)

    def score(self, seq: list[int], prop: Proposal, sampling: SamplingConfig) -> None:
        score(self.target, seq, prop)
        if prop.draft_logits is None and not sampling.greedy:  # a lookup's q: one-hot
            logits = prop.target_logits
            tokens = torch.tensor(prop.tokens, dtype=torch.long, device=logits.device)
            prop.draft_probs = torch.nn.functional.one_hot(tokens, logits.shape[-1]).float()


class _NoCache:
    """The stand-in draft cache of a lookup without a draft: ``decode`` prefills it and
    ``decoding.commit`` crops it; nothing reads it."""

    def __init__(self, device: torch.device):
        self.device, self.length = device, 0

    def prefill(self, ids: list[int]) -> None:
        pass

    def crop(self, length: int) -> None:
        pass

    def reset(self) -> None:
        pass


def lookup_generate(verifier: torch.nn.Module, proposer: torch.nn.Module | None,
                    prompt_ids: list[int], rule: AcceptanceRule, *, k: int = 4,
                    max_new_tokens: int = 128, sampling: SamplingConfig = GREEDY,
                    eos_ids: Iterable[int] = (), seed: int | None = None,
                    stats: DecodeStats | None = None, staged: bool = False
                    ) -> Iterator[Token]:
    """``decoding.decode`` with prompt-lookup proposals of up to k tokens (and, given a
    ``proposer``, the draft's where the lookup offers less than a whole block); ``staged``:
    the draft's k proposals every block, drafted in steps that check the lookup's guesses."""
    if k < 1:
        raise CospecError(f"k (proposal length) must be >= 1, got {k}")
    if rule.lossy or rule.needs_hidden or rule.lookahead:
        raise CospecError("prompt lookup verifies by the exact rule only")
    return decode(Lookup(verifier, proposer, staged=staged), prompt_ids, rule, k=k,
                  max_new_tokens=max_new_tokens, sampling=sampling, eos_ids=eos_ids,
                  seed=seed, stats=stats)
