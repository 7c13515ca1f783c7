"""The CoSpec arbiter: features at a draft/target mismatch, policies, the arbiter file, and
the acceptance rule that asks a policy at each mismatch (``ArbiterRule``).

A mismatch is a position where the draft's greedy token d differs from the target's greedy
token t for the same prefix. Features use only what the decoding step already has: both
models' logits at that position (and, optionally, their last hidden states). They do not
depend on where the position falls inside a speculative block, so a policy decides the same
way in the batch-1 loop and in the batched lockstep decoder.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cospec.acceptance import Proposal, Verdict
from cospec.errors import CospecError

FEATURES = (
    "logp_t_t", "logp_t_d", "logp_d_d", "logp_d_t",   # log p_model(token)
    "entropy_t", "entropy_d",
    "margin_t", "margin_d",                           # top-1 minus top-2 probability
    "top5_t", "top5_d",                               # top-5 probability mass
    "gap_t", "gap_d",                                 # log-prob gaps between t and d
    "log_position",                                   # log(1 + tokens generated before)
)


def _top5(logp: torch.Tensor) -> torch.Tensor:
    """The 5 largest values of each row [R, V] -> [R, 5], descending. When V splits into 128
    equal chunks, as a top-5 of per-chunk top-5s: two small kernels instead of a radix
    select over the whole vocabulary (same values)."""
    r, v = logp.shape
    if v % 128 == 0 and v // 128 >= 5:
        logp = logp.view(r, 128, -1).topk(5, dim=-1).values.view(r, -1)
    return logp.topk(5, dim=-1).values


def _row_stats(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """logits [R, V], ids [R, 2] -> [R, 8]: log-probs of the two ids, entropy, top-5
    log-probs (float32, on the logits' device)."""
    logp = logits.float().log_softmax(-1)
    ent = torch.special.entr(logp.exp()).sum(-1, keepdim=True)
    return torch.cat([logp.gather(1, ids), ent, _top5(logp)], dim=-1)


class GraphedRowStats:
    """``_row_stats`` on CUDA as replayed CUDA graphs. An arbiter call is launch-bound there
    (about ten small kernels over the vocabulary): the rows are copied into a static buffer
    and one graph runs, for the smallest of ``SIZES`` rows that holds them (the rows past
    them are stale and ignored). Every size is captured up front, so no capture falls
    inside a timed generation."""

    SIZES = (2, 4, 8, 16, 32)

    def __init__(self, device: torch.device, vocab: int):
        # normal tensors, even when first built inside inference mode: later calls may
        # come from outside it, and inference tensors cannot be written there
        with torch.inference_mode(False), torch.no_grad():
            self._build(device, vocab)

    def _build(self, device: torch.device, vocab: int) -> None:
        rows = self.SIZES[-1]
        self.x = torch.zeros(rows, vocab, device=device)
        self.ids = torch.zeros(rows, 2, dtype=torch.long, device=device)
        self.host = torch.zeros(rows, 2, dtype=torch.long, pin_memory=True)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for n in self.SIZES:  # warm-up outside the captures
                _row_stats(self.x[:n], self.ids[:n])
        torch.cuda.current_stream(device).wait_stream(stream)
        for n in self.SIZES:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = _row_stats(self.x[:n], self.ids[:n])
            self.graphs[n] = (graph, out)

    def __call__(self, rows: list[torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
        """rows: tensors [r_i, V] stacked in order (sum r_i = R <= 32); ids [R, 2] (CPU, or
        on the device) -> [R, 8] on the device (a view of a static buffer: read it before the
        next call)."""
        n = 0
        for part in rows:
            self.x[n:n + part.shape[0]].copy_(part)
            n += part.shape[0]
        if ids.is_cuda:
            self.ids[:n].copy_(ids)
        else:
            self.host[:n].copy_(ids)  # the previous call's copy out of it ended with .cpu()
            self.ids[:n].copy_(self.host[:n], non_blocking=True)
        graph, out = self.graphs[next(size for size in self.SIZES if size >= n)]
        graph.replay()
        return out[:n]


_GRAPHED: dict[tuple[torch.device, int], GraphedRowStats] = {}


def row_stats(rows: list[torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """``_row_stats`` of the rows stacked in order, ids [R, 2] -> [R, 8] (on the rows'
    device); on CUDA through ``GraphedRowStats`` unless COSPEC_EAGER=1 or there are more
    rows than it holds."""
    device, vocab = rows[0].device, rows[0].shape[-1]
    n = sum(part.shape[0] for part in rows)
    if (device.type != "cuda" or os.environ.get("COSPEC_EAGER") == "1"
            or n > GraphedRowStats.SIZES[-1]):
        return _row_stats(torch.cat(rows), ids.to(device))
    if (device, vocab) not in _GRAPHED:
        _GRAPHED[device, vocab] = GraphedRowStats(device, vocab)
    return _GRAPHED[device, vocab](rows, ids)


def _combine(row, b: int, position, xp=np):
    """Features [b, F] from the row statistics [2b, 8] of b target rows then b draft rows and
    the positions [b] (float32); ``xp``: numpy (arrays) or torch (tensors, for the graph of
    ``GraphedDecision``), the same arithmetic either way."""
    at_t, at_d, ent, top = row[:, 0], row[:, 1], row[:, 2], xp.exp(row[:, 3:])
    margin, mass = top[:, 0] - top[:, 1], top.sum(-1)
    tt, dt, td, dd = at_t[:b], at_t[b:], at_d[:b], at_d[b:]  # xy: model x's log-prob of y
    return xp.stack([tt, td, dd, dt, ent[:b], ent[b:], margin[:b], margin[b:], mass[:b],
                     mass[b:], tt - td, dd - dt, xp.log1p(position)], -1)


def device_features(target_logits: torch.Tensor, draft_logits: torch.Tensor, t: torch.Tensor,
                    d: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """``mismatch_features`` wholly on the logits' device, in torch (inside CUDA graphs, over
    batched rows): rows [n, V], t, d and positions [n] on that device -> [n, len(FEATURES)]
    float32."""
    ids = torch.stack([t, d], -1).repeat(2, 1)                                 # [2n, 2]
    row = _row_stats(torch.cat([target_logits.float(), draft_logits.float()]), ids)  # [2n, 8]
    return _combine(row, len(t), position.float(), torch)


def mismatch_features(target_logits: torch.Tensor, draft_logits: torch.Tensor,
                      t: torch.Tensor | list[int], d: torch.Tensor | list[int],
                      position: torch.Tensor | list[int]) -> torch.Tensor:
    """Scalar features [B, len(FEATURES)] (float32, on the CPU) from logits rows [B, V] and
    ids [B] (tensors on any device, or lists).

    An arbiter call is launch-bound on a GPU, so the device does only the vocabulary-wide
    work, for both models at once (``row_stats``) and sends 8 numbers per row to the host in
    one copy; the features are combined there, in numpy (a dozen tiny torch ops would cost
    more than the device work).
    """
    t, d, position = (np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x)
                      for x in (t, d, position))
    ids = torch.from_numpy(np.tile(np.stack([t, d], axis=-1), (2, 1)))    # [2B, 2]
    row = row_stats([target_logits, draft_logits], ids).cpu().numpy()     # [2B, 8]
    return torch.from_numpy(_combine(row, len(t), position.astype(np.float32)))


class MismatchPolicy(Protocol):
    """Decides, at a draft/target mismatch, how likely keeping the draft token is right."""

    needs_hidden: bool

    def draft_prob(self, features: torch.Tensor, target_hidden: torch.Tensor | None,
                   draft_hidden: torch.Tensor | None) -> torch.Tensor:
        """features [B, F] -> probability of DRAFT [B]."""
        ...


class GraphedDecision:
    """A whole arbiter decision on CUDA, for a policy that needs no hidden states: the row
    statistics, the features and the policy in one replayed CUDA graph; the host writes the
    two rows and (t, d, position) in and reads one probability back.

    Measured in the decoding loop on the H100, the host side of a decision ran several times
    slower than in a tight loop, so its cost was the count of small host operations (ids,
    numpy features, the policy: 0.6 of 0.85 ms; results/gpu/speed-cospec-graphed-h100), not the
    device's work. The policy runs on a device copy, captured again when the original changes
    (parameters updated in place, or a dataclass policy's fields)."""

    def __init__(self, policy: MismatchPolicy, device: torch.device, vocab: int):
        self.device, self.vocab, self.key = device, vocab, _policy_key(policy)
        with torch.inference_mode(False), torch.no_grad():
            self.policy = (copy.deepcopy(policy).to(device)
                           if isinstance(policy, torch.nn.Module) else policy)
            self.x = torch.zeros(2, vocab, device=device)
            self.host = torch.zeros(3, dtype=torch.long, pin_memory=True)
            self.ids = torch.zeros(3, dtype=torch.long, device=device)  # t, d, position
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):  # warm-up outside the capture
                out = self._decide()
            torch.cuda.current_stream(device).wait_stream(stream)
            if not isinstance(out, torch.Tensor) or out.device != device:
                raise TypeError("its draft_prob does not return a tensor on the GPU")
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.prob = self._decide()

    def _decide(self) -> torch.Tensor:
        return self.policy.draft_prob(device_features(self.x[:1], self.x[1:], self.ids[:1],
                                                      self.ids[1:2], self.ids[2:]))

    def fits(self, policy: MismatchPolicy, device: torch.device, vocab: int) -> bool:
        return (device, vocab, _policy_key(policy)) == (self.device, self.vocab, self.key)

    def __call__(self, target_row: torch.Tensor, draft_row: torch.Tensor, t: int, d: int,
                 position: int) -> float:
        """Rows [1, V] on the device -> P(DRAFT)."""
        self.x[:1].copy_(target_row)
        self.x[1:].copy_(draft_row)
        self.host.numpy()[:] = (t, d, position)  # the last call's copy has completed
        self.ids.copy_(self.host, non_blocking=True)
        self.graph.replay()
        return float(self.prob[0])


def _policy_key(policy: MismatchPolicy) -> tuple:
    """Changes when the policy does: its parameters' in-place version counters (a module),
    else its fields. A policy made inside ``torch.inference_mode()`` has inference tensors,
    which keep no counter: their data pointers stand in (an in-place update inside
    inference mode then goes unseen)."""
    if isinstance(policy, torch.nn.Module):
        return (id(policy), *(t.data_ptr() if t.is_inference() else t._version
                              for t in policy.state_dict(keep_vars=True).values()))
    return (id(policy), repr(policy))


# ---------------------------------------------------------------- policies


@dataclass
class ConstantPolicy:
    """Always DRAFT (p = 1) or always TARGET (p = 0): baselines and tests."""

    p: float
    needs_hidden: bool = False

    def draft_prob(self, features, target_hidden=None, draft_hidden=None):
        return torch.full((features.shape[0],), self.p, device=features.device)


@dataclass
class ConfidencePolicy:
    """Keep the draft token when the target's probability of it is within ``delta`` of the
    target's top choice: p_t(t) - p_t(d) <= delta."""

    delta: float = 0.1
    needs_hidden: bool = False

    def draft_prob(self, features, target_hidden=None, draft_hidden=None):
        i, j = FEATURES.index("logp_t_t"), FEATURES.index("logp_t_d")
        return (features[:, i].exp() - features[:, j].exp() <= self.delta).float()


@dataclass
class EntropyPolicy:
    """FLy-style entropy-gated deferral (simplified): when the target is uncertain
    (entropy >= ``threshold`` nats) defer to the draft's token, else take the target's."""

    threshold: float = 1.0
    needs_hidden: bool = False

    def draft_prob(self, features, target_hidden=None, draft_hidden=None):
        return (features[:, FEATURES.index("entropy_t")] >= self.threshold).float()


class LearnedPolicy(torch.nn.Module):
    """A small MLP (or linear, ``hidden_units = 0``) over standardised features, optionally
    concatenated with both models' last hidden states; outputs P(DRAFT) = sigmoid(logit)."""

    def __init__(self, n_features: int, hidden_sizes: tuple[int, int] | None = None,
                 hidden_units: int = 32):
        super().__init__()
        self.hidden_sizes = hidden_sizes  # (target d, draft d) when hidden states are used
        width = n_features + (sum(hidden_sizes) if hidden_sizes else 0)
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))
        self.net = (torch.nn.Sequential(torch.nn.Linear(width, hidden_units), torch.nn.Tanh(),
                                        torch.nn.Linear(hidden_units, 1))
                    if hidden_units else torch.nn.Linear(width, 1))
        self.hidden_units = hidden_units
        self._linears = [m for m in self.net.modules() if isinstance(m, torch.nn.Linear)]

    @property
    def needs_hidden(self) -> bool:
        return self.hidden_sizes is not None

    def inputs(self, features, target_hidden=None, draft_hidden=None) -> torch.Tensor:
        parts = [features.float()]
        if self.needs_hidden:  # a size of 0 leaves that model's hidden state out
            parts += [h.float().cpu() for h, d in zip((target_hidden, draft_hidden),
                                                       self.hidden_sizes) if d]
        return torch.cat(parts, dim=-1)

    def logit(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, width] (raw inputs) -> logit of DRAFT [B]."""
        return self.net((x - self.mean) / self.std).squeeze(-1)

    @torch.no_grad()
    def draft_prob(self, features, target_hidden=None, draft_hidden=None):
        x = self.inputs(features, target_hidden, draft_hidden)
        if x.shape[0] == 1 and self.mean.device.type == "cpu":
            return torch.from_numpy(self._one_row(x.numpy()))
        return torch.sigmoid(self.logit(x))

    def _one_row(self, x: np.ndarray) -> np.ndarray:
        """``sigmoid(logit(x))`` in numpy, on zero-copy views of the weights. The decoding
        loop asks one row at a time, milliseconds apart: torch's CPU kernels then pay for
        waking their thread pool (measured 0.22 ms a call on the GPU host, against 0.04 ms
        in a tight loop); numpy does not."""
        h = (x - self.mean.numpy()) / self.std.numpy()
        for j, m in enumerate(self._linears):
            h = h @ m.weight.detach().numpy().T + m.bias.detach().numpy()
            h = np.tanh(h) if j < len(self._linears) - 1 else h
        return (1.0 / (1.0 + np.exp(-h[:, 0]))).astype(np.float32)

# ---------------------------------------------------------------- the arbiter file


def save_arbiter(policy: LearnedPolicy, path: str | Path, pair: tuple[str, str],
                 info: dict | None = None) -> None:
    """Weights as safetensors; the feature spec, model pair and training info as metadata.
    A file that cannot be written (its folder neither there nor makeable, a full or
    read-only disk) is a CospecError naming it."""
    meta = {"format": "cospec-arbiter/1", "features": json.dumps(FEATURES),
            "hidden_sizes": json.dumps(policy.hidden_sizes),
            "hidden_units": str(policy.hidden_units),
            "target": pair[0], "draft": pair[1], "info": json.dumps(info or {})}
    tensors = {k: v.contiguous() for k, v in policy.state_dict().items()}
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=meta)
    except (SafetensorError, OSError) as err:  # SafetensorError is no OSError
        raise CospecError(f"cannot write the arbiter file {path}: {err}") from None


def arbiter_info(path: str | Path) -> dict:
    """The metadata of an arbiter file (raises CospecError if it is not one)."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise CospecError(f"arbiter file not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise CospecError(f"{path} is not a readable arbiter file: {err}") from None
    if meta.get("format") != "cospec-arbiter/1":
        raise CospecError(f"{path} is not a cospec arbiter file (format {meta.get('format')!r})")
    return meta


def _refuse_other_pair(path: str | Path, meta: dict, pair: tuple[str, str]) -> None:
    if (Path(meta["target"]).name, Path(meta["draft"]).name) != (
            Path(pair[0]).name, Path(pair[1]).name):
        raise CospecError(f"{path} was trained for target {meta['target']} / draft "
                          f"{meta['draft']}, not {pair[0]} / {pair[1]}")


def check_pair(path: str | Path, pair: tuple[str, str]) -> None:
    """Refuse the arbiter file ``path`` where it was trained for another (target, draft)
    than ``pair`` (compared by file name), as ``load_arbiter`` does; reads no weights."""
    _refuse_other_pair(path, arbiter_info(path), pair)


def load_arbiter(path: str | Path, pair: tuple[str, str] | None = None) -> LearnedPolicy:
    """Load an arbiter; with ``pair`` = (target, draft), refuse one trained for another pair."""
    meta = arbiter_info(path)
    if json.loads(meta["features"]) != list(FEATURES):
        raise CospecError(f"{path} was trained on other features; retrain it with this version")
    if pair is not None:
        _refuse_other_pair(path, meta, pair)
    hs = json.loads(meta["hidden_sizes"])
    policy = LearnedPolicy(len(FEATURES), tuple(hs) if hs else None, int(meta["hidden_units"]))
    try:
        policy.load_state_dict(load_file(str(path)))
    except (SafetensorError, RuntimeError) as err:
        raise CospecError(f"{path} is corrupt: {err}") from None
    if not all(math.isfinite(float(v.abs().sum())) for v in policy.state_dict().values()):
        raise CospecError(f"{path} holds non-finite weights")
    info = json.loads(meta["info"])
    policy.threshold = float(info.get("threshold", 0.5))
    policy.max_overrides = info.get("max_overrides")  # the budget it was tuned for (or None)
    return policy.eval()


@dataclass
class ArbiterRule:
    """CoSpec (greedy): at a mismatch d_i != t_i ask a policy; DRAFT keeps d_i and goes on
    checking d_{i+1} against t_{i+1} (already computed, conditioned on d_i: no extra pass);
    TARGET commits t_i and ends the block, as plain SPD does. Lossy by design.

    The bonus position is arbitrated like every other: when the scan reaches it, the verdict
    asks for the draft's *lookahead* token there (``wants_lookahead``; the loop drafts it by
    the draft's catch-up on [d_k, bonus] done one step early, only in blocks that get that
    far) and ``at_bonus`` decides. Every committed
    position then gets the same decision whatever the block structure, which is what makes
    batched lockstep decoding equal to this loop.
    """

    policy: MismatchPolicy
    threshold: float = 0.5
    every_mismatch: bool = True   # False: only the first mismatch of a block is arbitrated
    max_overrides: int | None = None  # draft tokens kept per generation at most (None: any)
    # on CUDA, each decision as one replayed graph (policies without hidden states)
    graphed: bool = True
    lossy: bool = True
    lookahead: bool = True
    needs_hidden: bool = field(init=False)
    _graph: object = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.needs_hidden = self.policy.needs_hidden

    def _keep_draft(self, prop: Proposal, i: int, t: int) -> bool:
        """DRAFT (True) or TARGET at the mismatch in row i (the bonus row when i = k), from
        the two rows' features. On CUDA, for a policy without hidden states, the whole
        decision is one replayed graph (``arbiter.GraphedDecision``); else the features are
        read back (one copy) and the policy runs on the host. Computed only when a mismatch
        is met: a pass over every row of every block, read back with the argmaxes, cost
        more on the GPU (0.85 ms a step against 0.8 ms a decision at 0.36 decisions a step;
        results/gpu/speed-cospec-graphed-h100)."""
        bonus = i == len(prop.tokens)
        d = prop.lookahead if bonus else prop.tokens[i]
        t_logits = prop.target_logits[i:i + 1]
        d_logits = prop.lookahead_logits if bonus else prop.draft_logits[i:i + 1]
        if (self.graphed and t_logits.is_cuda and not self.needs_hidden
                and os.environ.get("COSPEC_EAGER") != "1"):
            device, vocab = t_logits.device, t_logits.shape[-1]
            if self._graph is None or not self._graph.fits(self.policy, device, vocab):
                try:
                    self._graph = GraphedDecision(self.policy, device, vocab)
                except (RuntimeError, TypeError, ValueError) as err:  # host-only policy
                    warnings.warn(f"{type(self.policy).__name__} cannot run inside a CUDA "
                                  f"graph ({err}); its decisions run on the host",
                                  stacklevel=2)
                    self.graphed = False
                    return self._keep_draft(prop, i, t)
            prob = self._graph(t_logits, d_logits, t, d, prop.position + i)
            return prob >= self.threshold
        feats = mismatch_features(t_logits, d_logits, [t], [d], [prop.position + i])
        t_hid = d_hid = None
        if self.needs_hidden:
            t_hid = prop.target_hidden[i:i + 1]
            d_hid = prop.lookahead_hidden if bonus else prop.draft_hidden[i:i + 1]
        return float(self.policy.draft_prob(feats, t_hid, d_hid)[0]) >= self.threshold

    def _may_arbitrate(self, prop: Proposal, calls: int, overrides: int) -> bool:
        """Another mismatch of this block may go to the policy (first-only, budget)."""
        budget = (None if self.max_overrides is None
                  else self.max_overrides - prop.overrides_so_far)
        return (self.every_mismatch or not calls) and (budget is None or overrides < budget)

    def __call__(self, prop, sampling, gen):
        k = len(prop.tokens)
        best, spent = prop.target_logits.argmax(-1).tolist(), 0.0
        calls = overrides = 0
        for i in range(k):
            if prop.tokens[i] == best[i]:
                continue
            keep = False
            if self._may_arbitrate(prop, calls, overrides):
                t0 = time.perf_counter()
                keep = self._keep_draft(prop, i, best[i])
                spent += time.perf_counter() - t0
                calls += 1
            if not keep:
                return Verdict(i, best[i], calls, overrides, spent)
            overrides += 1
        # the bonus position: the draft's token there is drafted (by the loop) only if needed
        return Verdict(k, best[k], calls, overrides, spent,
                       wants_lookahead=self._may_arbitrate(prop, calls, overrides))

    def at_bonus(self, prop: Proposal, verdict: Verdict) -> Verdict:
        """The bonus position arbitrated like any other, now that the draft's token there
        (``prop.lookahead``) is known."""
        k, t = len(prop.tokens), verdict.next_token
        if prop.lookahead in (None, t):
            return replace(verdict, wants_lookahead=False)
        t0 = time.perf_counter()
        keep = self._keep_draft(prop, k, t)
        spent = verdict.arbiter_s + time.perf_counter() - t0
        return Verdict(k, prop.lookahead if keep else t, verdict.arbiter_calls + 1,
                       verdict.overrides + keep, spent, next_from_draft=keep)
