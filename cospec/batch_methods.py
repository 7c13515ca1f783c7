"""Which methods ``fast_batch.BatchEngine`` decodes, and the engine's arguments for each.

The engine runs target-only (``target``, ``draft``: one model, ``ExactRule``), speculative
decoding (``spd``: ``ExactRule`` with a draft), prompt lookup (``lookup``: no draft, each
row's proposals from its own sequence; not ``spd-lookup`` or ``spd-staged``, whose draft
checks the guesses at batch 1), the arbiter rules (``cospec``,
``confidence``, ``entropy``: ``ArbiterRule``) and the speculative CoS methods (``cos-we``,
``cos-cd``: alternate proposal; ``we-sd``, ``cd-sd``: lookahead), when every model it would
hold is one the fast path supports (Llama-family, not a tensor-parallel shard). It does not
run the autoregressive combinations ``we`` / ``cd`` (every token a pass of every model,
nothing drafted), nor contrastive decoding of more than two models.
"""

from __future__ import annotations

import torch

from cospec.acceptance import ExactRule
from cospec.arbiter import ArbiterRule
from cospec.cos import COS_METHODS
from cospec.fast import supported
from cospec.lookup import LOOKUP_METHODS
from cospec.methods import Method

BATCH_COS = tuple(m for m in COS_METHODS if "-" in m)  # the speculative ones: *-sd, cos-*


def engine_models(method: Method) -> tuple[torch.nn.Module, ...]:
    """Every model an engine of ``method`` holds a KV cache for: the proposer (if any),
    the middle models of a CoS combination, the verifier (the target) last."""
    if method.combo is not None:
        return tuple(method.models)
    return tuple(m for m in (method.proposer, method.verifier) if m is not None)


def proposes(method: Method) -> bool:
    """``method``'s engine verifies k proposals a step: a draft's, or prompt lookup's."""
    return method.proposer is not None or method.name == "lookup"


def engine_options(method: Method) -> dict | None:
    """``BatchEngine``'s keyword arguments beyond (target, draft, k, rows, max_len) that
    decode ``method`` — ``policy`` ... for an arbiter rule, ``combo``, ``middle`` and
    ``alternate`` for CoS — or None when no batch engine can decode it."""
    rule = method.rule
    if method.name == "lookup":  # each row's proposals from its own n-gram index
        kw = {"lookup": True}
    elif method.name in LOOKUP_METHODS:  # the draft checking guesses: batch 1 only
        return None
    elif method.combo is not None:
        if method.name not in BATCH_COS or method.proposer is None:
            return None
        if method.combo.kind == "cd" and len(method.models) != 2:
            return None
        kw = dict(combo=method.combo, middle=tuple(method.models[1:-1]),
                  alternate=method.name.startswith("cos-"))
    elif isinstance(rule, ArbiterRule):
        kw = dict(policy=rule.policy, threshold=rule.threshold,
                  max_overrides=rule.max_overrides, every_mismatch=rule.every_mismatch)
    elif isinstance(rule, ExactRule):
        kw = {}
    else:
        return None
    if not all(supported(m) and getattr(m, "engine_class", None) is None
               for m in engine_models(method)):
        return None
    return kw
