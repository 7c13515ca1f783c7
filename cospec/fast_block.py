"""Speculative decoding with the whole block on the device: the host queues blocks without
waiting for their verdicts.

``decode`` (``cospec.decoding``) reads each block's verdict on the host before it can start
the next: the GPU idles while the host synchronises, decides and launches. Here every quantity a
block needs lives on the device (``cospec.device_blocks``: the committed sequence, its
length, the drafts, the acceptance), so the tokens are plain greedy decoding's, as spd's are.
The host reads each block's (a, window) back through pinned memory, a block behind (AHEAD),
to stop at an EOS or at ``max_new_tokens``; the blocks queued past the stop are dropped.

On a GPU the whole block is one CUDA graph, on static ``seq`` and ``length`` buffers: the host
launches a block, not a step. It is captured on a pair's first block (after two runs of it on
a side stream, whose ``length`` updates are undone) and kept for the engines and k. With
``graph=False`` (or COSPEC_BLOCK_GRAPH=0) a block is k + 1 replays of the engines' step graphs
and a dozen small kernels between them, each launched by the host (on the real pair on an
H200 the one graph was 2-4 % faster, results/gpu/h200/speed-fused-block-graph).

The variants (``cospec.device_blocks``): spd-staged's guessed block, CoSpec's and CoS's ruled
block, sampled spd's, spd-staged's and CoS's sampled blocks.

Batch 1, prompts of two or more tokens, models on ``fast.StaticLM`` engines. ``stream``
yields the tokens as the blocks' verdicts return; spd, spd-staged, cos-we and cos-cd,
greedy or sampled, and greedy cospec (and the heuristics) (``methods.Method.stream``:
``cospec eval``, ``generate``, the API) take it wherever they can (``serves``;
COSPEC_SPD_BLOCK=0: never).
On that path, cospec eval's speed pass on an H200, spd made 1.12x / 1.26x target-only on
GSM8K / HumanEval against the host loop's 1.09x / 1.20x, and 1.19x / 1.32x against
1.16x / 1.32x on another machine (results/gpu/h200/spd-block-user-path).
"""

from __future__ import annotations

import collections
import weakref
from collections.abc import Callable, Iterable, Iterator

import torch

from cospec import fast
from cospec.block_choice import ArbiterChoice, Choice, CombinationChoice
from cospec.decoding import HeldClock, Token
from cospec.device_blocks import held_state, run_block
from cospec.errors import CospecError
from cospec.sampling import GREEDY, SamplingConfig
from cospec.settings import choice
from cospec.stats import DecodeStats

# Blocks queued past the last one whose verdict the host has read (the default). On an H100
# (real pair, k = 4, same runs) 1 against 2: GSM8K tied (spd-graph 871 / 868 tok/s), HumanEval,
# whose shorter answers end more often, 3-4 % faster (spd-graph 903 / 877, spd-staged with
# the int8 draft 1,328 / 1,279): fewer blocks decoded past an EOS, and one queued block
# already keeps the device busy (results/gpu/h100/block-ahead).
AHEAD = 1
# prompt-lookup guesses a spd-staged block's first draft step checks (``guessed_block``): of
# 2, 4 and 6 on an H100, 6 gained most on HumanEval and lost nothing on GSM8K
# (results/gpu/h100/staged-device-real-pair)
GUESSES = 6
class BlockGraph:
    """A whole block as one CUDA graph for a target and a draft engine, k, m guesses
    (``guessed_block``; 0: ``block``), a choice (``ruled_block``) or a sampling config
    (``sampled_block``): ``seq`` [target's max_len], ``length`` [1] and, with a choice,
    ``held`` are its static state, ``run()`` replays it (capturing it first) and returns its
    static verdict, overwritten by the next run. A sampled block's draws come from the
    default CUDA generator, or from ``run(rng)``'s generator."""

    def __init__(self, tgt: fast.Engine, drf: fast.Engine, k: int, guesses: int = 0,
                 choice: Choice | None = None, sampling: SamplingConfig = GREEDY) -> None:
        # weak: the graphs are kept by the engines (``_GRAPHS``), not the engines by them
        self.tgt, self.drf = weakref.ref(tgt), weakref.ref(drf)
        self.device = tgt.device
        self.seq = torch.zeros(tgt.max_len, dtype=torch.long, device=tgt.device)
        self.length = torch.zeros(1, dtype=torch.long, device=tgt.device)
        self.span = torch.arange(k + guesses + 1, device=tgt.device)
        self.guesses, self.choice, self.sampling = guesses, choice, sampling
        self.held = held_state(tgt) if choice is not None else None  # ruled blocks only
        self.graph: torch.cuda.CUDAGraph | None = None
        self.verdict: torch.Tensor | None = None

    def _block(self) -> torch.Tensor:
        tgt, drf = self.tgt(), self.drf()
        return run_block(lambda ids, start: drf._forward(ids, start, eager=False),
                         lambda ids, start: tgt._forward(ids, start, eager=False),
                         self.seq, self.length, self.span, self.guesses, self.held, self.choice,
                         self.sampling)

    def run(self, rng: torch.Generator | None = None) -> torch.Tensor:
        """Replay the block (captured on the first run, from the default generator's draws
        whatever ``rng``). ``rng``: the replay draws from that CUDA generator's state and
        advances it, the default generator's left as it was. A replay reads its generator's
        seed and offset when it is launched (torch's graph-safe RNG), so the default one
        holds ``rng``'s state for the launch only: host work, no device read."""
        if self.graph is None:  # the warm-up runs' writes are the ones the replay makes
            state = [self.length, *(self.held or ())]  # again; their state updates are
            saved = [t.clone() for t in state]        # undone

            def warm_up() -> None:
                self._block()
                for t, before in zip(state, saved):
                    t.copy_(before)

            self.graph, self.verdict = fast.capture_graph(
                self.device, torch.cuda.graph_pool_handle(), self._block, warm_up=warm_up)
        if rng is None:
            self.graph.replay()
            return self.verdict
        default = torch.cuda.default_generators[self.device.index
                                                if self.device.index is not None
                                                else torch.cuda.current_device()]
        saved = default.get_state()
        default.set_state(rng.get_state())
        try:
            self.graph.replay()
        finally:
            rng.set_state(default.get_state())
            default.set_state(saved)
        return self.verdict


# target engine -> draft engine -> {(k, guesses, choice's key, sampling): BlockGraph}, gone
# with either engine
_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# sampling configs (temperature, top-k, top-p) an engine pair keeps a block graph for: the
# first ones met; a request with another samples in the step graphs' blocks
SAMPLED_GRAPHS = 8


def captured_graphs() -> int:
    """Block graphs captured so far, of engines still alive: a speed run reads it around a
    timed generation to know whether a capture fell inside it."""
    return sum(g.graph is not None for by_draft in _GRAPHS.values()
               for graphs in by_draft.values() for g in graphs.values())


def captures() -> tuple[int, float]:
    """(block graphs captured, the pooled engines' capture seconds): read around a timed
    generation, a change says a capture (or a new engine, replacing a smaller one) fell
    inside it."""
    return captured_graphs(), fast.capture_seconds()


def warm_until_settled(warm: Callable[[], object], rounds: int) -> None:
    """Call ``warm`` (one warm-up round over every method a timing compares) up to ``rounds``
    times, again while a round captured (``captures``): a later method's device-side block
    may have made a larger engine in place of an earlier method's, whose one-row graph the
    next round captures, not a timed run."""
    for _ in range(rounds):
        before = captures()
        warm()
        if captures() == before:
            return


def block_graph(tgt: fast.Engine, drf: fast.Engine, k: int, guesses: int = 0,
                choice: Choice | None = None, sampling: SamplingConfig = GREEDY
                ) -> BlockGraph | None:
    """The block graph of these engines, k, guesses, choice (by its ``key``: an equal
    choice reuses the graph) and sampling config, made once (captured on its first run);
    None for a sampling config past the first SAMPLED_GRAPHS of the pair."""
    graphs = _GRAPHS.setdefault(tgt, weakref.WeakKeyDictionary()).setdefault(drf, {})
    key = (k, guesses, None if choice is None else choice.key, sampling)
    if key not in graphs:
        if not sampling.greedy and sum(not g.sampling.greedy for g in graphs.values()
                                       ) >= SAMPLED_GRAPHS:
            return None
        graphs[key] = BlockGraph(tgt, drf, k, guesses, choice, sampling)
    return graphs[key]


def blocks_ahead() -> int:
    """COSPEC_BLOCK_AHEAD: the blocks ``stream`` queues past the last one whose verdict the
    host has read, 1-4 (unset: AHEAD), fewer where those queued may already reach
    ``max_new_tokens``. Those queued when a verdict shows an EOS are decoded and dropped, in
    the generation's time: fewer waste less at the end, more keep the device busy through a
    slower host."""
    return int(choice("COSPEC_BLOCK_AHEAD", ("1", "2", "3", "4"), str(AHEAD)))


def one_graph() -> bool:
    """COSPEC_BLOCK_GRAPH: each block one CUDA graph (1, unset: the default) or k + 1 step
    graphs and the kernels between them launched by the host (0)."""
    return choice("COSPEC_BLOCK_GRAPH", ("0", "1"), "1") == "1"


def serving() -> bool:
    """COSPEC_SPD_BLOCK: the methods ``methods.Method.stream`` brings here (spd, spd-staged,
    greedy cospec and CoS) run here where they can (``serves``; 1, unset: the default) or
    always in their host loops (0)."""
    return choice("COSPEC_SPD_BLOCK", ("0", "1"), "1") == "1"


def serves(target: torch.nn.Module, draft: torch.nn.Module, prompt_ids: list[int]) -> bool:
    """Do this pair and prompt stream from here (``Method.device_block`` asks which
    methods)? With ``serving()``, where
    both models run on the fast path's engines (``fast.wanted``: on CUDA), on one device,
    neither a tensor-parallel shard, and the prompt has two or more tokens."""
    if not serving() or len(prompt_ids) < 2:
        return False
    models = (target, draft)
    return (all(fast.wanted(m) and getattr(m, "engine_class", None) is None for m in models)
            and len({next(m.parameters()).device for m in models}) == 1)


def spd_greedy(target: torch.nn.Module, draft: torch.nn.Module, prompt_ids: list[int], *,
               k: int = 5, max_new_tokens: int = 128, eos_ids: Iterable[int] = (),
               stats: DecodeStats | None = None, graph: bool | None = None,
               guesses: int = 0, choice: Choice | None = None) -> list[int]:
    """``stream``'s tokens as a list of ids."""
    return [t.id for t in stream(target, draft, prompt_ids, k=k, max_new_tokens=max_new_tokens,
                                 eos_ids=eos_ids, stats=stats, graph=graph, guesses=guesses,
                                 choice=choice)]


@torch.inference_mode()
def stream(target: torch.nn.Module, draft: torch.nn.Module, prompt_ids: list[int], *,
           k: int = 5, max_new_tokens: int = 128, eos_ids: Iterable[int] = (),
           stats: DecodeStats | None = None, graph: bool | None = None, guesses: int = 0,
           choice: Choice | None = None, sampling: SamplingConfig = GREEDY,
           seed: int | None = None) -> Iterator[Token]:
    """The target's greedy continuation of ``prompt_ids`` (at most ``max_new_tokens``, up to
    and including an EOS), by speculative decoding with ``draft``'s k tokens a block,
    yielded as each block's verdict is read back (``blocks_ahead()`` behind the device); a token
    is ``from_draft`` where it is a draft the target accepted. ``stats`` (if given) gets the
    blocks as steps (drafted and accepted tokens), the tokens, and the prefill and decode
    time (the decode clock stops while the caller holds a token). ``graph``: each block one
    CUDA graph where both engines use graphs (None: unless COSPEC_BLOCK_GRAPH=0).
    ``guesses``: each block's first draft step also checks that many prompt-lookup guesses
    (``guessed_block``: k + c proposals, ``spd-staged``). ``choice``: each position's token
    is the choice of both models' rows there (``ruled_block``: greedy CoSpec and CoS; a
    token is ``from_draft`` where it is not the target's own). ``sampling`` (T > 0): a
    sample of the target's processed distribution instead (``sampled_block``; with a
    combination's choice, of the combination: ``ruled_sampled_block``), drawn from a
    generator seeded with ``seed`` where one is given (through a block graph too:
    ``BlockGraph.run``), else from the default one. Inference mode holds while the loop
    runs, not between yields."""
    if len(prompt_ids) < 2:
        raise CospecError("the device-side block needs a prompt of two or more tokens")
    if k < 1:
        raise CospecError(f"k (draft length) must be >= 1, got {k}")
    if guesses < 0 or (guesses and k + guesses + 1 > fast.MAX_GRAPH):
        raise CospecError(f"guesses must be >= 0, and with guesses a verify's k + guesses + 1 "
                          f"rows at most {fast.MAX_GRAPH}; got k = {k}, guesses = {guesses}")
    if guesses and choice is not None:
        raise CospecError("a block checks prompt-lookup guesses or takes a choice, not both")
    if not sampling.greedy and choice is not None and not isinstance(choice, CombinationChoice):
        raise CospecError("a sampled block (T > 0) takes no arbiter's choice (CoSpec is "
                          "greedy): spd's, spd-staged's or a CoS combination's")
    sampling = GREEDY if sampling.greedy else sampling  # one greedy graph, whatever top-p
    stats = stats if stats is not None else DecodeStats()
    if max_new_tokens < 1:  # as ``decode``: nothing to generate
        return
    eos, start = set(eos_ids), len(prompt_ids)
    ahead = blocks_ahead()
    room = start + max_new_tokens + (ahead + 2) * (k + guesses + 1) + 2
    lms = [fast.StaticLM(m, max_len=room) for m in (target, draft)]
    tgt, drf = (lm.engine for lm in lms)
    device = tgt.device
    t0 = fast.clock(device)
    for lm in lms:
        lm.prefill(prompt_ids[:-1])
    t1 = fast.clock(device)
    stats.prefill_s += t1 - t0
    if graph is None:
        graph = one_graph()
    gen = (torch.Generator(device).manual_seed(seed)
           if seed is not None and not sampling.greedy else None)
    whole = (block_graph(tgt, drf, k, guesses, choice, sampling)
             if graph and tgt.use_graphs and drf.use_graphs else None)
    if whole is not None:  # the graph's own state (its span made with it)
        seq, length, held = whole.seq, whole.length, whole.held
    else:
        seq = torch.zeros(room, dtype=torch.long, device=device)
        length = torch.zeros(1, dtype=torch.long, device=device)
        span = torch.arange(k + guesses + 1, device=device)
        held = held_state(tgt) if choice is not None else None
    seq[:start] = torch.tensor(prompt_ids, device=device)
    length.fill_(start)
    if held is not None:
        held.pending.zero_()
        held.prompt.fill_(start)
    queued: collections.deque = collections.deque()  # (host copy, its event) a block
    clock = HeldClock(device, stats, t1)
    produced, pending = 0, False
    most = k + guesses + 1  # the tokens one block commits at most
    while True:
        # one block, queued on the device, unless those queued may already reach the budget
        # (a block past it would be decoded and dropped; past an EOS that cannot be known)
        if produced + len(queued) * most < max_new_tokens:
            verdict = (whole.run(gen) if whole is not None
                       else run_block(drf.run_device, tgt.run_device, seq, length, span,
                                      guesses, held, choice, sampling, gen))
            queued.append(fast.to_host(verdict))
            if len(queued) <= ahead:
                continue
        # the verdict of the oldest queued block, read without stalling the newer ones
        host, done = queued.popleft()
        if done is not None:
            done.synchronize()
        if choice is None:
            a, *window = host.tolist()
            proposed = window.pop(0) if guesses else k
            stats.record_step(proposed, a)
            tokens = [Token(tok, j < a) for j, tok in enumerate(window[:a + 1])]
        else:
            tokens, pending = ruled_tokens(host.tolist(), k, pending, stats,
                                           isinstance(choice, ArbiterChoice))
        stats.device_blocks += 1
        for tok in tokens:
            produced += 1
            stats.generated += 1
            if tok.id in eos or produced >= max_new_tokens:
                # the blocks queued past the stop are this call's work: its clock counts them
                yield from clock.last(tok)
                return
            yield from clock.hand(tok)


def ruled_tokens(verdict: list[int], k: int, pending: bool, stats: DecodeStats,
                 asks: bool) -> tuple[list[Token], bool]:
    """The tokens a ``ruled_block`` verdict commits, given whether a token was pending
    before it, and whether one is after it; its step, overrides (and, where the choice
    ``asks`` an arbiter, the mismatches met as its calls) go to ``stats``."""
    a, ok, overrides, met, y, *window = verdict
    tokens = [Token(y, not ok)] if pending else []
    if ok:
        tokens += [Token(t, True) for t in window[:a]]
        if a < k:
            tokens.append(Token(window[a], False))
    stats.record_step(k + pending, a + (pending and ok))
    stats.overrides += overrides
    stats.arbiter_calls += met if asks else 0
    return tokens, bool(ok) and a == k
