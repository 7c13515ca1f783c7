"""Greedy CoSpec and CoS with each block on the device (``device_blocks.ruled_block``) commit
their host loops' tokens (``decoding.generate`` with ``ArbiterRule``, ``cos.cos_generate``):
a learned policy, the confidence heuristic and one of positions, a weighted ensemble and
contrastive decoding; drafts that always, partly and never agree; k = 1, 2, 5; up to an EOS
and max_new_tokens; on the CPU and, where one is present, through CUDA graphs. The pending
token's choice both keeps and overrides the target's (the block's ``ok`` both ways), and
``Method.stream`` takes the block where it can."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from test_fast_block import drafts
from tiny import tiny_model

from cospec import device_blocks, fast, fast_block
from cospec.arbiter import FEATURES, ArbiterRule, ConfidencePolicy, LearnedPolicy
from cospec.block_choice import CombinationChoice, arbiter_choice
from cospec.cos import Combination, cos_generate
from cospec.decoding import generate
from cospec.stats import DecodeStats

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


def learned() -> LearnedPolicy:
    torch.manual_seed(3)
    return LearnedPolicy(len(FEATURES), hidden_units=8).eval()


@dataclass
class EvenPositions:
    """Keeps the draft's token where an even number of tokens came before: a policy any
    misplaced position changes."""

    needs_hidden: bool = False

    def draft_prob(self, features, target_hidden=None, draft_hidden=None):
        before = features[:, FEATURES.index("log_position")].exp().sub(1).round()
        return (before % 2 == 0).float()


def rules() -> dict[str, ArbiterRule]:
    return {"learned": ArbiterRule(learned(), threshold=0.5),
            "confidence": ArbiterRule(ConfidencePolicy(0.3)),
            "even positions": ArbiterRule(EvenPositions())}


def combos() -> dict[str, Combination]:
    return {"we": Combination("we", (0.4, 0.6)), "cd": Combination("cd", mu=0.3)}


def watch_ok(monkeypatch) -> list[int]:
    """The ``ok`` of every ruled block run on the CPU (graphs hide theirs)."""
    seen, ruled = [], device_blocks.ruled_block

    def watched(*args):
        verdict = ruled(*args)
        if verdict.device.type == "cpu":  # never read inside a graph's capture
            seen.append(int(verdict[1]))
        return verdict

    monkeypatch.setattr(device_blocks, "ruled_block", watched)
    return seen


def start(monkeypatch, device: str) -> tuple[list[int], torch.nn.Module]:
    """Engines on the CPU too, no graphs kept from earlier tests, the blocks' ``ok`` watched
    (``watch_ok``); returns it and the target."""
    monkeypatch.setenv("COSPEC_STATIC", "1")
    fast_block._GRAPHS.clear()
    return watch_ok(monkeypatch), tiny_model(11, dtype=torch.float32).to(device)


def cases(device: str, host) -> list[tuple]:
    """(draft name, draft, prompt, k, EOS ids): drafts that always, partly and never agree,
    two prompts, k = 1, 2, 5, with no EOS and with the 8th token of ``host``'s output
    (``host(draft, prompt, k, eos)``: the host loop's token ids) as one."""
    out = []
    for draft_name, draft in drafts(device).items():
        for prompt in ([5, 17, 33, 2, 60, 41], [3, 9]):
            plain = host(draft, prompt, 3, ())
            out += [(draft_name, draft, prompt, k, eos) for k in (1, 2, 5)
                    for eos in ((), (plain[7],))]
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("graph", [False, True])
def test_cospec_blocks_commit_the_host_loops_tokens(monkeypatch, device, graph):
    seen, target = start(monkeypatch, device)
    overrides = 0
    for name, rule in rules().items():
        def host(draft, prompt, k, eos, rule=rule):
            return [t.id for t in generate(target, draft, prompt, rule, k=k,
                                           max_new_tokens=30, eos_ids=eos)]

        for draft_name, draft, prompt, k, eos in cases(device, host):
            stats = DecodeStats()
            got = fast_block.spd_greedy(target, draft, prompt, k=k, max_new_tokens=30,
                                        eos_ids=eos, stats=stats, graph=graph,
                                        choice=arbiter_choice(rule, target.device))
            want = host(draft, prompt, k, eos)
            assert got == want, (name, draft_name, prompt, k, eos)
            assert stats.generated == len(want) and stats.steps == stats.device_blocks >= 1
            assert stats.arbiter_calls >= stats.overrides
            overrides += stats.overrides
    assert overrides > 0  # some draft tokens were kept at mismatches
    if device == "cpu":  # the pending token was kept (most often) and overridden
        assert 0 in seen and seen.count(1) > seen.count(0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("graph", [False, True])
def test_cos_blocks_commit_the_host_loops_tokens(monkeypatch, device, graph):
    seen, target = start(monkeypatch, device)
    for name, combo in combos().items():
        def host(draft, prompt, k, eos, combo=combo, method=f"cos-{name}"):
            return [t.id for t in cos_generate([draft, target], prompt, combo, method,
                                               gamma=k, max_new_tokens=30, eos_ids=eos)]

        for draft_name, draft, prompt, k, eos in cases(device, host):
            choice = CombinationChoice(combo, target.device)
            got = fast_block.spd_greedy(target, draft, prompt, k=k, max_new_tokens=30,
                                        eos_ids=eos, graph=graph, choice=choice)
            assert got == host(draft, prompt, k, eos), (name, draft_name, prompt, k, eos)
    if device == "cpu":
        assert 0 in seen and 1 in seen


def test_step_outputs_overwritten_by_the_next_step_do_not_change_the_tokens(monkeypatch):
    """As CUDA step graphs do, each engine returns its logits in one static buffer that its
    next step overwrites (on the CPU, stood in): the block keeps its rows (copies)."""
    monkeypatch.setenv("COSPEC_STATIC", "1")
    run, buffers = fast.Engine.run_device, {}

    def static(self, ids, start):
        logits, hidden = run(self, ids, start)
        buf = buffers.setdefault(id(self), torch.empty(fast.MAX_GRAPH, logits.shape[-1]))
        buf[:len(ids)].copy_(logits)
        return buf[:len(ids)], hidden

    target, draft = tiny_model(11, dtype=torch.float32), drafts("cpu")["near"]
    prompt, combo = [5, 17, 33, 2, 60, 41], combos()["we"]
    want = [t.id for t in cos_generate([draft, target], prompt, combo, "cos-we", gamma=4,
                                       max_new_tokens=30)]
    monkeypatch.setattr(fast.Engine, "run_device", static)
    got = fast_block.spd_greedy(target, draft, prompt, k=4, max_new_tokens=30, graph=False,
                                choice=CombinationChoice(combo, target.device))
    assert buffers and got == want


def test_choices_trace_whole_and_fall_back_when_compiling_fails(monkeypatch):
    """On CUDA a choice runs compiled (COSPEC_COMPILE=0: eagerly; on the CPU eagerly).
    Traced whole (fullgraph: no break), every choice commits the host loops' tokens; a
    compile that fails warns once and the eager call goes on, same tokens."""
    monkeypatch.setenv("COSPEC_STATIC", "1")
    target, draft = tiny_model(11, dtype=torch.float32), drafts("cpu")["near"]
    prompt, cpu = [5, 17, 33, 2, 60, 41], torch.device("cpu")
    made = {**{name: (arbiter_choice(rule, cpu), rule) for name, rule in rules().items()},
            **{name: (CombinationChoice(combo, cpu), combo) for name, combo in combos().items()}}
    for name, (choice, how) in made.items():
        if isinstance(how, ArbiterRule):
            want = [t.id for t in generate(target, draft, prompt, how, k=3, max_new_tokens=30)]
        else:
            want = [t.id for t in cos_generate([draft, target], prompt, how, f"cos-{name}",
                                               gamma=3, max_new_tokens=30)]
        assert choice._run == choice._choose  # the CPU: eager
        choice._run = torch.compile(choice._choose, backend="aot_eager", dynamic=False,
                                    fullgraph=True)
        got = fast_block.spd_greedy(target, draft, prompt, k=3, max_new_tokens=30,
                                    graph=False, choice=choice)
        assert got == want, name

        def broken(*args):
            raise RuntimeError("no compiler here")

        choice._run = broken
        with pytest.warns(UserWarning, match="compiling failed .* it runs eagerly"):
            got = fast_block.spd_greedy(target, draft, prompt, k=3, max_new_tokens=30,
                                        graph=False, choice=choice)
        assert got == want and choice._run == choice._choose, name
    combo = combos()["we"]
    compiled = CombinationChoice(combo, torch.device("cuda"))  # compiled at its first call
    assert compiled._run != compiled._choose
    monkeypatch.setenv("COSPEC_COMPILE", "0")
    eager = CombinationChoice(combo, torch.device("cuda"))
    assert eager._run == eager._choose


def test_a_choice_is_made_once_for_its_policy_and_device():
    """Every generation of a method gets the same choice object (its compiled call traced
    once), until the policy's weights change in place; another threshold, policy or
    combination gets its own."""
    from cospec.block_choice import combination_choice

    cpu, policy = torch.device("cpu"), learned()
    first = arbiter_choice(ArbiterRule(policy, threshold=0.5), cpu)
    assert arbiter_choice(ArbiterRule(policy, threshold=0.5), cpu) is first
    assert arbiter_choice(ArbiterRule(policy, threshold=0.6), cpu) is not first
    assert arbiter_choice(ArbiterRule(learned(), threshold=0.5), cpu) is not first
    with torch.no_grad():
        policy.net[0].weight.add_(1.0)  # trained further, in place
    assert arbiter_choice(ArbiterRule(policy, threshold=0.5), cpu) is not first
    with torch.inference_mode():  # a policy made there: no version counters to read
        made_there = learned()
    inner = arbiter_choice(ArbiterRule(made_there, threshold=0.5), cpu)
    assert arbiter_choice(ArbiterRule(made_there, threshold=0.5), cpu) is inner
    we = combination_choice(combos()["we"], cpu)
    assert combination_choice(Combination("we", (0.4, 0.6)), cpu) is we
    assert combination_choice(combos()["cd"], cpu) is not we


def test_budgets_first_mismatch_and_hidden_states_stay_in_the_host_loop():
    """Rules the block does not express give no choice (the host loop serves them)."""
    device = torch.device("cpu")
    assert arbiter_choice(ArbiterRule(learned()), device) is not None
    assert arbiter_choice(ArbiterRule(learned(), max_overrides=3), device) is None
    assert arbiter_choice(ArbiterRule(learned(), every_mismatch=False), device) is None
    hidden = LearnedPolicy(len(FEATURES), hidden_sizes=(32, 32), hidden_units=8)
    assert arbiter_choice(ArbiterRule(hidden), device) is None


def test_methods_stream_cospec_and_cos_from_the_block(monkeypatch):
    """``Method.stream`` of greedy cospec / confidence and cos-we / cos-cd takes the ruled
    block where greedy spd takes its block (not we-sd, not with COSPEC_SPD_BLOCK=0), with
    the host loop's tokens either way; sampled, cos-we takes its own (test_sampled_block)."""
    from cospec.methods import Method
    from cospec.sampling import SamplingConfig

    monkeypatch.setenv("COSPEC_STATIC", "1")
    target, draft = tiny_model(11, dtype=torch.float32), drafts("cpu")["near"]
    calls = []
    block_stream = fast_block.stream
    monkeypatch.setattr(fast_block, "stream", lambda *a, **kw: calls.append(
        kw.get("choice")) or block_stream(*a, **kw))
    we = Combination("we", (0.5, 0.5))
    methods = [Method("cospec", target, draft, rules()["learned"]),
               Method("confidence", target, draft, rules()["confidence"]),
               Method("cos-we", target, draft, None, we, (draft, target)),
               Method("we-sd", target, draft, None, we, (draft, target))]
    greedy = SamplingConfig()
    for setting in ("1", "0"):
        monkeypatch.setenv("COSPEC_SPD_BLOCK", setting)
        for m in methods:
            calls.clear()
            got = [t.id for t in m.stream([5, 17, 33], k=3, max_new_tokens=20,
                                          sampling=greedy, eos_ids=())]
            if m.combo is not None:
                want = [t.id for t in cos_generate([draft, target], [5, 17, 33], we, m.name,
                                                   gamma=3, max_new_tokens=20)]
            else:
                want = [t.id for t in generate(target, draft, [5, 17, 33], m.rule, k=3,
                                               max_new_tokens=20)]
            assert got == want, m.name
            on_block = setting == "1" and m.name != "we-sd"
            assert len(calls) == on_block and (not calls or calls[0] is not None), m.name
    monkeypatch.setenv("COSPEC_SPD_BLOCK", "1")
    calls.clear()
    hot = SamplingConfig(temperature=0.8)  # sampled: cos-we's own block, we-sd its loop
    for m in methods[2:]:
        list(m.stream([5, 17, 33], k=3, max_new_tokens=10, sampling=hot, eos_ids=(), seed=0))
    assert len(calls) == 1 and calls[0] is not None
