"""``cospec eval`` and ``cospec bench``: methods side by side on a task's problems.

Accuracy goes through the batched lockstep decoder (greedy methods) — the only way to score
hundreds of problems with a 1.5B model on a small machine; speed is measured at batch 1 with
the real loop on a subset, every method on the same problems, interleaved per problem after
a warm-up, so machine noise hits all methods alike. Results are appended to JSONL files
as they finish: rerunning the same command resumes where it stopped (on a finished folder it
loads the models, decodes nothing and writes the summary again); ``cospec summarize FOLDER``
writes it again from the records alone, loading no model.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

from cospec import fast, fast_block
from cospec.args import changed_settings, note_unread_options, options_of, resolved_dtype
from cospec.decoding import warm_up_budgets
from cospec.errors import CospecError, check_writable, read_json
from cospec.eval_setup import EvalSetup
from cospec.methods import GREEDY_ONLY, LOSSY, METHODS, SAME_AS_GREEDY
from cospec.report import (
    in_turn,
    machine_load,
    markdown_table,
    mcnemar,
    pct,
    plot_accuracy_speed,
    wilson,
)
from cospec.tasks import get_task

IDENTITY = ("task", "split", "target", "draft", "models", "k", "max_new_tokens", "temperature",
            "top_p", "top_k", "seed", "no_chat", "dtype", "draft_weights")
# identity keys that folders made before they were recorded lack: the value such a folder
# had (None: unknown, not compared)
LATER_KEYS = {"dtype": None, "draft_weights": "model"}


# ---------------------------------------------------------------- the results folder


# the fields every record of a file holds, that the summary reads from each
RECORD_FIELDS = {"accuracy": ("correct",),
                 "speed": ("correct", "token_ids", "generated", "steps", "accepted",
                           "accepted_at", "prefill_s", "decode_s", "arbiter_s", "peak_mem_gb"),
                 "throughput": ("path", "tokens", "seconds")}


class RunDir:
    """A results folder bound to one configuration (refused if it holds another one's
    results); JSONL record files keyed by (id, method). ``save_config`` writes the
    configuration once the run's other checks have passed."""

    def __init__(self, path: str | Path, config: dict):
        self.path, self.config = Path(path), config
        check_writable(self.path, f"--out {self.path}")
        self.path.mkdir(parents=True, exist_ok=True)
        cfg_file = self.path / "config.json"
        if cfg_file.exists():
            old = read_config(cfg_file, keys=())  # its values are only compared
            diff = changed_settings(old, config, IDENTITY, LATER_KEYS)
            if diff:
                lines = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
                raise CospecError(f"{self.path} holds results of another configuration ({lines}); "
                                  "use another --out, or delete that folder to start fresh")

    def save_config(self) -> None:
        (self.path / "config.json").write_text(json.dumps(self.config, indent=1))

    def records(self, name: str) -> dict[tuple[str, str], dict]:
        """``name``.jsonl's records by (id, method); a line that is not a record (a JSON
        object with a string id and method, and the ``RECORD_FIELDS`` of its file) is
        refused, naming the file and line."""
        f = self.path / f"{name}.jsonl"
        if not f.exists():
            return {}
        out = {}
        for n, line in enumerate(f.read_text().splitlines(), 1):
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash: that problem is redone
                continue
            if not isinstance(r, dict):
                wrong = f"a JSON {json_kind(r)}, not a record (an object)"
            else:
                wrong = ", ".join([f"no string {k!r}" for k in ("id", "method")
                                   if not isinstance(r.get(k), str)]
                                  + [f"no {k!r}" for k in RECORD_FIELDS.get(name, ())
                                     if k not in r])
            if wrong:
                raise CospecError(f"{f}, line {n}: {wrong}; fix or delete that line (a deleted "
                                  "record is redone by eval / bench)")
            out[(r["id"], r["method"])] = r
        return out

    def append(self, name: str, records: list[dict]) -> None:
        with open(self.path / f"{name}.jsonl", "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())


# config.json keys read by the summary, and what each must hold
CONFIG_TYPES = {"task": (str, "a task name"),
                "methods": (str, 'a comma-separated list of methods, such as "target,spd"'),
                "split": ((str, type(None)), "a split name or null"),
                "limit": ((int, type(None)), "a number of problems or null"),
                "temperature": ((int, float, type(None)), "a number or null")}


def json_kind(value) -> str:
    """What JSON calls ``value``'s type."""
    kinds = {dict: "object", list: "array", str: "string", bool: "true/false",
             type(None): "null"}
    return kinds.get(type(value), "number")


def read_config(path: Path, keys: tuple[str, ...] = tuple(CONFIG_TYPES)) -> dict:
    """A results folder's config.json: a JSON object whose ``keys`` (those the summary reads)
    hold what ``CONFIG_TYPES`` says; CospecError naming the file and the key otherwise."""
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise CospecError(f"{path} holds a JSON {json_kind(cfg)}, not the object of a run's "
                          "settings; fix it, or delete its folder to start fresh")
    for key in keys:
        types, what = CONFIG_TYPES[key]
        if key in cfg and not isinstance(cfg[key], types):
            raise CospecError(f"{path}: {key!r} is {json.dumps(cfg[key])}, not {what}; fix it, "
                              "or delete its folder to start fresh")
    return cfg


def file_sha(path: str | None) -> str | None:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16] if path else None


# ---------------------------------------------------------------- memory


class PeakMemory:
    """Peak memory during a block: CUDA allocator peak, or the process RSS sampled at 50 Hz."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.rss())

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak = self.rss()
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.rss())


# ---------------------------------------------------------------- the run


def _config(args) -> dict:
    """The run's configuration: its IDENTITY (the dtype resolved for the device: float32 on
    a CPU, bfloat16 on a GPU unless --dtype says), methods and limit."""
    cfg = {k: getattr(args, k, None) for k in IDENTITY}
    cfg["dtype"] = resolved_dtype(args)
    cfg["draft_weights"] = getattr(args, "draft_weights", "model")
    cfg.update(methods=args.methods, limit=args.limit)
    return cfg


def method_opts(s: EvalSetup, m: str) -> dict:
    """The options a lossy method's results depend on (stored with each of its records)."""
    rule = s.built[m].rule
    if m == "cospec":
        out = {"arbiter_sha": file_sha(s.arbiter_path), "threshold": rule.threshold,
               "every_mismatch": rule.every_mismatch}
    elif m in ("confidence", "entropy"):
        out = {"policy": repr(rule.policy), "every_mismatch": rule.every_mismatch}
    if m in LOSSY:
        if rule.max_overrides is not None:  # absent when unlimited: older records stay valid
            out["max_overrides"] = rule.max_overrides
        return out
    if s.built[m].combo is not None:
        return {"combo": repr(s.built[m].combo)}
    return {}


def check_opts(s: EvalSetup, done: dict, run: RunDir) -> None:
    """Refuse to mix results of a lossy method run with different options."""
    for (_, m), r in done.items():
        if m in s.built and r.get("opts", {}) != method_opts(s, m):
            raise CospecError(f"{run.path} holds {m} results made with other options "
                              f"({r.get('opts')} vs {method_opts(s, m)}); use another --out")


def _methods(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise CospecError(f"--methods {text!r} names no method; choose from {', '.join(METHODS)}")
    bad = [m for m in names if m not in METHODS]
    if bad:
        raise CospecError(f"unknown method(s) {', '.join(bad)}; choose from "
                          f"{', '.join(METHODS)}")
    twice = sorted({m for m in names if names.count(m) > 1})
    if twice:  # each would be timed and reported twice
        raise CospecError(f"--methods names {', '.join(twice)} more than once")
    if "target" not in names:
        names.insert(0, "target")  # every speedup is measured against it
    return names


def accuracy_pass(s: EvalSetup, run: RunDir) -> None:
    """Score every method on every problem with its own tokens.

    Target-only, draft-only, the lossy rules and the autoregressive combinations go through
    the batched lockstep decoder. The exact speculative methods (spd, *-sd, cos-*) are run
    with their own loop, never copied from the method they reproduce: in bf16 a k+1-row
    verify rounds unlike a one-row step, so their tokens can differ. spd and the speculative
    CoS methods on a GPU go through the batch engine (``fast_batch``: the same speculation,
    many rows at once, at T > 0 exact in distribution too), the others at batch 1; a problem
    the speed pass already decoded reuses those tokens where the method is scored at batch 1
    (same loop, same settings).
    """
    from cospec.batched import lockstep

    a = s.args
    done = run.records("accuracy")
    check_opts(s, done, run)
    timed = run.records("speed")
    for method in s.methods:
        if method == "hf-assisted":
            continue  # the peer is measured at batch 1 only (speed subset)
        todo = [i for i, p in enumerate(s.problems) if (p.id, method) not in done]
        if not todo:
            continue
        same = SAME_AS_GREEDY.get(method)
        engine = uses_batch_engine(s, method)
        if same and not s.sampling.greedy and not engine:
            # an exact sampler of `same`'s distribution (tests/test_exactness.py): the batched
            # decoder samples that distribution but not this method's draws, so the method is
            # scored on the batch-1 speed subset only
            print(f"accuracy {method}: samples exactly as {same} does; scored on the batch-1 "
                  "speed subset only")
            continue
        m = s.built[method]
        two_models = m.combo is None or len(m.models) == 2
        batched = two_models and same is None
        # the batch-1 loop's tokens for the problems the speed pass decoded with it; the
        # batched decoders decode every problem, so that 'batched = b1' checks them
        reused = [] if batched or engine else [timed[(s.problems[i].id, method)] for i in todo
                                               if (s.problems[i].id, method) in timed]
        if reused:
            run.append("accuracy", [accuracy_record(s, r["id"], method, r["token_ids"],
                                                    r["correct"], "batch1",
                                                    r.get("overrides", 0),
                                                    r.get("arbiter_calls", 0))
                                    for r in reused])
            got = {r["id"] for r in reused}
            todo = [i for i in todo if s.problems[i].id not in got]
            if not todo:
                continue
        bar = tqdm(total=len(todo), desc=f"accuracy {method}", unit="problem")
        right = total = 0
        chunk = max(a.batch_size * 4, 1) if batched or engine else 1
        for start in range(0, len(todo), chunk):
            idx = todo[start:start + chunk]
            if engine:
                t0 = time.perf_counter()
                outs = [(ids, 0, 0) for ids in engine_decode(s, method, idx)]
                dt = time.perf_counter() - t0
                path = "batch-engine"
            elif batched:
                policy = getattr(m.rule, "policy", None)
                t0 = time.perf_counter()
                res = lockstep(m.verifier, m.proposer if policy or m.combo else None,
                               [s.prompts[i] for i in idx], max_new_tokens=a.max_new_tokens,
                               eos_ids=s.eos, pad_id=s.pad, batch_size=a.batch_size,
                               policy=policy, threshold=getattr(m.rule, "threshold", 0.5),
                               combo=m.combo, sampling=s.sampling,
                               seed=(a.seed or 0) + start,
                               max_overrides=getattr(m.rule, "max_overrides", None))
                dt = time.perf_counter() - t0
                outs = [(r.tokens, r.overrides, r.mismatches) for r in res]
                path = "batched"
            else:
                outs, dt = [], 0.0
                for i in idx:
                    ids, _, st = s.run_one(method, i)
                    outs.append((ids, st.overrides, st.arbiter_calls))
                    dt += st.decode_s + st.prefill_s
                path = "batch1"
            correct = s.grade([(i, o[0]) for i, o in zip(idx, outs)])
            recs = [accuracy_record(s, s.problems[i].id, method, o[0], c, path, o[1], o[2])
                    for i, o, c in zip(idx, outs, correct)]
            run.append("accuracy", recs)
            total += len(recs)
            right += sum(correct)
            # named by its first problem: unique across resumes (done problems never return)
            run.append("throughput", [{"id": f"chunk:{s.problems[idx[0]].id}", "method": method,
                                       "path": path,
                                       "sequences": len(idx), "seconds": dt,
                                       "tokens": sum(len(o[0]) for o in outs)}])
            bar.update(len(idx))
            bar.set_postfix(acc=f"{right / total:.1%}")
        bar.close()
        done = run.records("accuracy")


def uses_batch_engine(s: EvalSetup, method: str) -> bool:
    """spd and the speculative CoS methods (cos-*, *-sd) on CUDA, where a batch engine runs
    them on these models (``batch_methods``): decode them with it (their own tokens, many
    rows at once) rather than one problem at a time. Not with an int8 draft: the batch
    engines read the draft's own weights, the batch-1 engines its int8 copies."""
    from cospec.batch_methods import BATCH_COS, engine_options

    return (method in ("spd", *BATCH_COS) and s.device.type == "cuda"
            and getattr(s.args, "draft_weights", "model") == "model"
            and engine_options(s.built[method]) is not None)


def check_draft_weights(args, methods: list[str]) -> None:
    """Refuse, before any model loads, an eval whose accuracy pass would decode with
    another draft than its speed pass. On a CPU an int8 draft's steps read its copies in the
    batched decoder too (``cpu_int8``); on a GPU only the batch-1 engines do, so there the
    methods the batched decoder runs with the draft (draft, cospec and the other lossy
    rules, we, cd) are refused; target, hf-assisted and the exact speculative methods
    (decoded at batch 1) are kept."""
    if getattr(args, "draft_weights", "model") == "model" or args.command != "eval":
        return
    from cospec.models import check_device, default_device

    if not check_device(args.device or default_device()).startswith("cuda"):
        return
    batched = [m for m in methods if m not in ("target", "hf-assisted", *SAME_AS_GREEDY)]
    if batched:
        raise CospecError(f"--draft-weights {args.draft_weights} on a GPU: eval's batched "
                          f"accuracy pass would decode {', '.join(batched)} with the draft's "
                          "own weights; leave those methods out, or use bench (batch 1 "
                          "only), or --device cpu")


def engine_decode(s: EvalSetup, method: str, idx: list[int]) -> list[list[int]]:
    """Problems ``idx`` decoded by ``method`` in a ``fast_batch.BatchEngine`` (rows: the
    run's batch size, at most 256); problem i's draws are seeded with seed + i."""
    from cospec.batch_methods import engine_options
    from cospec.fast_batch import generate_batch

    a, m = s.args, s.built[method]
    return generate_batch(m.verifier, m.proposer, [s.prompts[i] for i in idx],
                          max_new_tokens=a.max_new_tokens, sampling=s.sampling,
                          seeds=[(a.seed or 0) + i for i in idx],
                          rows=max(1, min(a.batch_size, 256)), k=a.k, eos_ids=s.eos,
                          **engine_options(m))


def accuracy_record(s: EvalSetup, pid: str, method: str, ids: list[int], correct: bool,
                    path: str, overrides: int, mismatches: int) -> dict:
    """One graded answer of ``method`` (its own tokens), as stored in accuracy.jsonl."""
    return {"id": pid, "method": method, "correct": correct, "path": path,
            "opts": method_opts(s, method), "tokens": len(ids), "overrides": overrides,
            "mismatches": mismatches, "token_ids": ids, "text": s.text(ids),
            **s.grader()}


# methods timed whole, their prefill inside their decode time: paired with prefill added
WHOLE_TIMED = ("hf-assisted",)


def speed_pass(s: EvalSetup, run: RunDir, n: int) -> None:
    """Batch-1 timing with the real loop on the first n problems, interleaved per problem."""
    done = run.records("speed")
    check_opts(s, done, run)
    idx = [i for i in range(min(n, len(s.problems)))
           if any((s.problems[i].id, m) not in done for m in s.methods)]
    if not idx:
        return
    passes = speed_passes(run) or []  # a damaged file is refused before the work, not after
    start = machine_load()
    # warm-up: allocator, kernels, thread pools and every step shape, on the longest problem;
    # where the fast path captures CUDA graphs, first at the full budget, so that the caches
    # every timed problem needs (their graphs captured) exist before the clock runs, and
    # again while a round captured (``fast_block.warm_until_settled``)
    longest = max(idx, key=lambda i: len(s.prompts[i]))
    full = [None] if fast.wanted(s.pair.target) else []  # None: --max-new-tokens

    def warm() -> None:
        for m in s.methods:
            for budget in (*full, 8, *warm_up_budgets(s.args.k)):
                s.run_one(m, longest, max_new_tokens=budget)

    fast_block.warm_until_settled(warm, rounds=3 if full else 1)
    bar = tqdm(total=len(idx), desc="speed (batch 1)", unit="problem")
    for turn, i in enumerate(idx):
        recs = []
        for m in in_turn(s.methods, turn):
            pid = s.problems[i].id
            if (pid, m) in done:
                continue
            before = fast_block.captures()
            with PeakMemory(s.device) as mem:
                ids, flags, st = s.run_one(m, i)
            recs.append({"id": pid, "method": m, "opts": method_opts(s, m),
                         "token_ids": ids, "text": s.text(ids),
                         "captured": fast_block.captures() != before,  # inside the clock
                         "peak_mem_gb": mem.peak / 2**30, **st.to_dict(), **s.grader()})
        for r, c in zip(recs, s.grade([(i, r["token_ids"]) for r in recs])):
            r["correct"] = c
        run.append("speed", recs)
        bar.update(1)
    bar.close()
    (run.path / "speed_load.json").write_text(
        json.dumps([*passes, {"start": start, "end": machine_load()}]))


def load_point_wrong(point) -> str | None:
    """What is wrong with one start or end of a speed pass in speed_load.json (the fields of
    ``machine_load()`` that the summary reads); None if nothing. A missing one is null."""
    if point is None:
        return None
    if not isinstance(point, dict):
        return f"a JSON {json_kind(point)}, not an object of load averages"
    wrong = [f"no {k!r}" if k not in point else f"{k!r} is {json.dumps(point[k])}, not a number"
             for k in ("load1", "load5", "cpus")
             if isinstance(point.get(k), bool) or not isinstance(point.get(k), (int, float))]
    return ", ".join(wrong) or None


def speed_passes(run: RunDir) -> list[dict] | None:
    """The machine's load at the start and end of each speed pass (``speed_load.json``: one
    ``{"start", "end"}`` or a list of them); None where none was recorded. A file of another
    shape is refused (CospecError naming it, the pass and what is wrong)."""
    load_file = run.path / "speed_load.json"
    if not load_file.exists():
        return None
    passes = read_json(load_file)
    passes = passes if isinstance(passes, list) else [passes]
    for n, p in enumerate(passes, 1):
        if not isinstance(p, dict):
            wrong = f"a JSON {json_kind(p)}, not a {{\"start\", \"end\"}} object"
        else:
            wrong = "; ".join(f"{w!r}: {bad}" for w in ("start", "end")
                              if (bad := load_point_wrong(p.get(w))))
        if wrong:
            raise CospecError(f"{load_file}, pass {n}: {wrong}; fix it, or delete the file "
                              "(it only feeds the report's note on the machine's load)")
    return passes


def summarize(run: RunDir, command: str) -> dict:
    """summary.json, report.md and accuracy_vs_speedup.png from the record files alone.

    Needs no model: the methods, problems and sampling come from the folder's config.json, the
    results from its JSONL records, the machine's load from ``speed_load.json`` (``{"start":
    machine_load(), "end": machine_load()}``, or a list of those, one per speed pass), so a
    finished folder can be summarized again (``cospec summarize``). ``command``: eval | bench.
    """
    import math

    from cospec.report import LOAD_MARGIN, load_verdict, paired_speed
    from cospec.sampling import SamplingConfig

    cfg = read_config(run.path / "config.json")
    methods = _methods(cfg["methods"])
    task = get_task(cfg["task"])
    problems = task.problems(cfg.get("split"))
    if cfg.get("limit") is not None:
        problems = problems[:cfg["limit"]]
    greedy = SamplingConfig(cfg.get("temperature") or 0.0).greedy
    acc, speed = run.records("accuracy"), run.records("speed")
    k = cfg.get("k")
    if k == "auto":  # the length it chose: the most drafts one step of our loop made
        k = max((len(r["accepted_at"]) for (_, m), r in speed.items() if m != "hf-assisted"),
                default="auto")
    title = (f"{command}: {task.name}/{task.split(cfg.get('split'))}, {len(problems)} problems, "
             f"k={k}, T={cfg.get('temperature')}, max {cfg.get('max_new_tokens')} tokens")
    ids = [p.id for p in problems]
    rows, summary = [], {"config": cfg, "methods": {}}
    base_speed = [speed.get((i, "target")) for i in ids]  # speedups are against target
    for m in methods:
        row: dict = {"method": m + (" (lossy)" if m in GREEDY_ONLY else "")}
        got = [acc.get((i, m)) for i in ids]
        scored = [(i, r["correct"]) for i, r in zip(ids, got) if r]
        if not scored and not greedy and command == "eval":
            # exact samplers at T > 0 are scored on the speed subset (full-length answers)
            scored = [(i, speed[(i, m)]["correct"]) for i in ids if (i, m) in speed]
            if scored:
                row["method"] += " (b=1 subset)"
        if scored:
            k, n = sum(c for _, c in scored), len(scored)
            lo, hi = wilson(k, n)
            row.update(n=n, accuracy=pct(k / n), ci=f"[{pct(lo)}, {pct(hi)}]")
            tgt = {i: acc[(i, "target")]["correct"] for i, _ in scored if (i, "target") in acc}
            if m != "target" and tgt:
                pairs = [(c, tgt[i]) for i, c in scored if i in tgt]
                test = mcnemar([x for x, _ in pairs], [y for _, y in pairs])
                row.update(vs_target=f"+{test['a_only']}/-{test['b_only']}",
                           p=f"{test['p_value']:.3g}")
                summary["methods"].setdefault(m, {})["mcnemar_vs_target"] = test
            summary["methods"].setdefault(m, {}).update(correct=k, n=n, accuracy=k / n,
                                                        ci95=[lo, hi])
        sp = [(b, speed.get((i, m))) for i, b in zip(ids, base_speed)]
        sp = [(b, r) for b, r in sp if b and r]
        if sp:
            ps = paired_speed(sp, ratio_prefill=m in WHOLE_TIMED)
            # exact methods must reproduce their base (spd: target; *-sd, cos-*: we / cd)
            ref = SAME_AS_GREEDY.get(m, "target")
            same = sum(r["token_ids"] == (speed.get((r["id"], ref)) or {}).get("token_ids")
                       for _, r in sp) if greedy else None  # T > 0: other draws
            scored_as = [acc.get((r["id"], m)) or {} for _, r in sp]  # not a b1 copy of r
            batched = [a.get("token_ids") if greedy and a.get("path") != "batch1" else None
                       for a in scored_as]
            agree = [b == r["token_ids"] for b, (_, r) in zip(batched, sp) if b is not None]
            steps = sum(r["steps"] for _, r in sp)
            info = {"speed_n": len(sp), **ps,
                    "tau": 1 + sum(r["accepted"] for _, r in sp) / steps if steps else None,
                    "identical": same, "identical_to": ref,
                    "batched_agreement": (sum(agree) / len(agree)) if agree else None,
                    "peak_mem_gb": max(r["peak_mem_gb"] for _, r in sp),
                    # None where the arbiter ran inside device-side blocks (not timed)
                    "arbiter_share": (None if any(r.get("device_blocks") for _, r in sp)
                                      else sum(r["arbiter_s"] for _, r in sp)
                                      / max(ps["total_decode_s"], 1e-9))}
            summary["methods"].setdefault(m, {}).update(info)
            lo, hi = ps["ratio_ci95"]
            ci = "" if math.isnan(lo) else f" [{lo:.2f}, {hi:.2f}]"
            row.update(speed_n=len(sp), tok_s=ps["tokens_per_s"],
                       speedup=f"{ps['speedup']:.2f}x",
                       speedup_all=f"{ps['speedup_with_prefill']:.2f}x",
                       ratio=None if m == "target" else f"{ps['ratio_median']:.2f}x{ci}",
                       tau=info["tau"],
                       same=None if same is None else f"{same}/{len(sp)} {ref}",
                       agree=None if not agree else f"{sum(agree)}/{len(agree)}",
                       mem=info["peak_mem_gb"])
        rows.append(row)
    thr = run.records("throughput")
    for m in methods:
        ch = [r for (_, mm), r in thr.items() if mm == m and r["path"] == "batched"]
        if ch:
            summary["methods"].setdefault(m, {})["batched_tokens_per_s"] = (
                sum(r["tokens"] for r in ch) / sum(r["seconds"] for r in ch))
    columns = [
        ("method", "method"), ("n", "n"), ("accuracy", "accuracy %"), ("ci", "95% CI"),
        ("vs_target", "vs target (+/-)"), ("p", "McNemar p"), ("speed_n", "speed n"),
        ("tok_s", "tok/s (b=1)"), ("speedup", "speedup"), ("speedup_all", "incl. prefill"),
        ("ratio", "median paired ratio [95% CI]"), ("tau", "τ"),
        ("same", "identical to"), ("agree", "batched = b1"), ("mem", "peak GB")]
    table = markdown_table(rows, [c for c in columns  # bench: no accuracy columns
                                  if any(r.get(c[0]) is not None for r in rows)])
    passes = speed_passes(run)
    if passes is not None and speed:
        load = load_verdict(passes)
        pts = [f"{p['start']['load1']:.2f} → {p['end']['load1']:.2f}" for p in load["passes"]
               if p.get("start") and p.get("end")]
        load_md = (f"Machine load during the speed pass (1-min load average, start → end): "
                   f"{'; '.join(pts)}, on {load['cpus']} cores (peak 1/5-min: "
                   f"{load['peak_load']:.2f}).")
        if load["overloaded"]:
            load_md = ("**Warning: the machine's load exceeded its core count (by more than "
                       f"{LOAD_MARGIN}) during the speed pass — other jobs competed for the CPU, "
                       "so these timings are not a fair measurement.** " + load_md)
    else:
        load = None
        load_md = "Machine load during the speed pass: load not recorded." if speed else ""
    summary["speed_load"] = load
    captured = sorted({f"{m} on {i}" for (i, m), r in speed.items() if r.get("captured")})
    if captured:  # the clock ran while a CUDA graph was captured or an engine was made
        load_md = (f"**Warning: {len(captured)} timed run(s) captured a CUDA graph or made "
                   f"an engine inside their time ({', '.join(captured[:6])}"
                   f"{', ...' if len(captured) > 6 else ''}): those times include it.** "
                   + load_md)
    summary["captured_in_timing"] = captured
    (run.path / "summary.json").write_text(json.dumps(summary, indent=1))
    peer = ("hf-assisted times transformers' `generate` whole, so its prefill is inside its "
            "decode time: compare it on 'incl. prefill' (its median paired ratio has prefill "
            "added to both). " if "hf-assisted" in methods else "")
    md = [f"# {title}", "", f"`{cfg.get('command', '')}`", "", table, "",
          ("accuracy: batched lockstep decoding (greedy: equal to the batch-1 loop; 'batched = "
           "b1' counts agreement on the speed subset, — where the method is scored with its "
           "batch-1 tokens; T > 0: rows sample the target's or r's "
           "distribution, which spd/*-sd/cos-* sample exactly, so those are scored on the "
           "batch-1 subset only); McNemar: exact, paired vs target (+ right only here / − "
           "right only for target); " if any(r.get("n") for r in rows) else "") +
          "speed: batch 1, real loop, same problems, interleaved; "
          "tok/s = all decoded tokens ÷ all decode time over the speed subset; speedup = that "
          "÷ target's on the same problems ('incl. prefill': with prefill time added to both); "
          "median paired ratio = median over problems of (this method's decode tok/s ÷ "
          "target's on that problem), with its exact 95% interval (order statistics; none "
          "below 6 problems) — a stalled problem moves the totals by the time it took and "
          "barely moves the median, so the two disagreeing flags noise; " + peer +
          "τ = 1 + accepted/steps; "
          "'identical to': outputs equal to those of the method named (spd must equal target, "
          "*-sd and cos-* must equal we / cd at T = 0).",
          "", load_md]
    (run.path / "report.md").write_text("\n".join(md).rstrip() + "\n")
    pts = [{"method": m, "accuracy": v.get("accuracy"), "ci": v.get("ci95"),
            "speedup": v.get("speedup")} for m, v in summary["methods"].items()]
    plot_accuracy_speed(pts, run.path / "accuracy_vs_speedup.png", title)
    print(table)
    return summary


def cmd_eval(args) -> int:
    import shlex
    import sys

    if args.limit is not None and args.limit <= 0:
        raise CospecError(f"--limit must be > 0, got {args.limit}")
    methods = _methods(args.methods)
    check_draft_weights(args, methods)
    note_unread_options(options_of(args), methods)
    get_task(args.task).split(args.split)  # a bad task or split must not reach the folder
    cfg = _config(args)
    cfg["command"] = "cospec " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    run = RunDir(args.out, cfg)
    s = EvalSetup(args, methods)
    for name in ("speed", "accuracy"):  # before anything of this run is written
        check_opts(s, run.records(name), run)
    run.save_config()
    # speed first: the exact methods' accuracy reuses the tokens it decoded at batch 1
    speed_pass(s, run, args.speed_subset if args.command == "eval" else len(s.problems))
    if args.command == "eval":
        accuracy_pass(s, run)
    summarize(run, args.command)
    print(f"results in {run.path}/ (report.md, summary.json, *.jsonl)")
    return 0


def cmd_summarize(args) -> int:
    """Summarize finished eval/bench folders again from their records, loading no model."""
    for path in args.folders:
        folder = Path(path)
        if not folder.is_dir():
            raise CospecError(f"{folder} does not exist" if not folder.exists()
                              else f"{folder} is a file, not an eval/bench results folder")
        cfg = read_config(folder / "config.json") if (folder / "config.json").exists() else {}
        if not {"task", "methods"} <= set(cfg):
            raise CospecError(f"{folder} is not an eval/bench results folder (no config.json "
                              "naming its task and methods)")
        if (folder / "accuracy.jsonl.gz").exists() and not (folder / "accuracy.jsonl").exists():
            raise CospecError(f"{folder}: gunzip accuracy.jsonl.gz first (the summary reads "
                              "accuracy.jsonl)")
        words = str(cfg.get("command", "")).split()
        command = words[1] if words[1:2] in (["eval"], ["bench"]) else (
            "eval" if (folder / "accuracy.jsonl").exists() else "bench")
        summarize(RunDir(folder, cfg), command)
        print(f"summarized {folder}/ (report.md, summary.json)")
    return 0


def add_parsers(sub, add_model_args, add_decoding_args) -> None:
    from cospec.args import add_draft_weights_arg, nonneg_int, positive_int
    from cospec.tasks import TASK_NAMES

    p = sub.add_parser("summarize", help="rewrite the report of finished eval/bench folders "
                       "from their records (no models loaded, nothing decoded)")
    p.add_argument("folders", nargs="+", help="results folders written by eval or bench")
    p.set_defaults(func=cmd_summarize)

    for name, helptext in (("eval", "accuracy (batched) and speed (batch 1) on a task"),
                           ("bench", "batch-1 speed of methods on a task's prompts")):
        p = sub.add_parser(name, help=helptext)
        add_model_args(p)
        add_decoding_args(p)
        p.add_argument("--task", required=True, help=f"one of {', '.join(TASK_NAMES)}")
        p.add_argument("--split", default=None, help="gsm8k: dev|heldout|all; code: test")
        p.add_argument("--limit", type=int, default=None, help="first N problems")
        p.add_argument("--methods", default="target,spd" if name == "eval"
                       else "target,spd,hf-assisted")
        p.add_argument("--out", required=True, help="results folder (resumable)")
        add_draft_weights_arg(p)
        if name == "eval":
            p.add_argument("--batch-size", type=positive_int, default=8)
            p.add_argument("--speed-subset", type=nonneg_int, default=0,
                           help="also time the first N problems at batch 1")
        else:
            p.set_defaults(batch_size=1, speed_subset=0)
        p.set_defaults(func=cmd_eval)
