"""Decoding metrics, defined once and used by the CLI, the reports and the tests."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class DecodeStats:
    """Counters of one generation (or a sum of several).

    Terminology (as in vLLM's rejection sampler): per step the proposer *drafts* k tokens; the
    verifier *accepts* a prefix of them; then one more token is committed, either *recovered*
    (at a rejection) or the *bonus* (all k accepted). Mean acceptance length
    ``tau = 1 + accepted / steps`` counts that extra token. As vLLM counts them, the drafts a
    step's verify accepted count whole where a stop (an EOS, the token budget) cuts the step's
    tokens short, so a generation that stops inside a block has ``tau`` above
    ``generated / steps`` (one step of 10 tokens, 12 drafts accepted: ``tau`` 13).
    """

    steps: int = 0               # verify passes (target forward passes after prefill)
    drafted: int = 0             # draft tokens proposed
    accepted: int = 0            # draft tokens accepted (arbiter overrides included)
    generated: int = 0           # token ids produced, EOS included, after stop truncation
    accepted_at: list[int] = field(default_factory=list)  # [i]: steps accepting > i drafts
    arbiter_calls: int = 0       # mismatches handed to an arbiter
    overrides: int = 0           # mismatches where the draft's token was kept
    prefill_s: float = 0.0
    decode_s: float = 0.0
    arbiter_s: float = 0.0       # time spent inside the arbiter (part of decode_s)
    device_blocks: int = 0       # steps run as device-side blocks (``cospec.fast_block``):
    #                              an arbiter there runs inside them, its time not measured

    @property
    def tau(self) -> float:
        return 1.0 + self.accepted / self.steps if self.steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: generated tokens over decode time (prefill excluded)."""
        return self.generated / self.decode_s if self.decode_s > 0 else 0.0

    def record_step(self, drafted: int, accepted: int) -> None:
        self.steps += 1
        self.drafted += drafted
        self.accepted += accepted
        while len(self.accepted_at) < drafted:
            self.accepted_at.append(0)
        for i in range(accepted):
            self.accepted_at[i] += 1

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(tau=self.tau, acceptance_rate=self.acceptance_rate,
                   tokens_per_s=self.tokens_per_s)
        return out
