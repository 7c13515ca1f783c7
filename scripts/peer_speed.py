"""Batch-1 speed of cospec beside the engines a user would pick instead, each in its own process.

    python scripts/peer_speed.py prompts --task gsm8k --n 10 --out DIR/prompts.json
    python scripts/peer_speed.py run --engine ENGINE --method target|spd|spd-staged|lookup \
        --prompts DIR/prompts.json
        --new 256 --k 5 --target PATH --draft PATH --out DIR/ENGINE-METHOD.json
    python scripts/peer_speed.py table DIR

Methods: ``target`` (the target alone), ``spd`` (a draft model's proposals), ``lookup``
(proposals copied from the prompt and output so far, no draft: vLLM's n-gram speculator,
transformers' prompt lookup decoding) and ``spd-staged`` (cospec's fastest greedy form: the
draft checks the prompt lookup's guesses; cospec only).
Engines: ``cospec`` (its own loop: the CUDA fast path on a GPU), ``hf`` (transformers'
``generate``: eager, and static cache + compile; spd = assisted generation with the default
and with a constant schedule; the best configuration is reported), ``vllm`` (GPU;
target-only, draft-model speculation or its n-gram speculator, on the CPU or the GPU) and
``llamacpp`` (CPU, on the GGUF files; scripts/peer_llamacpp.py).
Every engine gets the same prompt token ids (chat template applied once, by ``prompts``),
greedy decoding and exactly ``--new`` new tokens (EOS does not stop a request), one request
at a time after an untimed pass over every prompt; a request is timed end to end (prefill
included). Each ``run`` is one process that loads its models fresh, so no engine times a
model another one touched.
``table`` writes DIR/peers.json and DIR/peers.md: total tokens ÷ total time per engine and
method (its fastest configuration over every file of DIR that holds the pair), and the
median of per-prompt paired ratios against cospec's (with its quartiles).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def machine() -> dict:
    """Where and under what load a run was made."""
    out = {"host": platform.node(), "cpus": os.cpu_count(), "load": os.getloadavg(),
           "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        import torch

        out["torch"] = torch.__version__
        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return out


def cmd_prompts(args) -> None:
    from transformers import AutoTokenizer

    from cospec.methods import encode_prompt
    from cospec.models import resolve
    from cospec.tasks import get_task

    tok = AutoTokenizer.from_pretrained(str(resolve(args.tokenizer)))
    out = {"tasks": [], "ids": [], "prompts": []}
    for task in args.task.split(","):
        problems = get_task(task).problems("heldout" if task == "gsm8k" else "test")[:args.n]
        out["tasks"] += [task] * len(problems)
        out["ids"] += [p.id for p in problems]
        out["prompts"] += [encode_prompt(tok, p.prompt) for p in problems]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out))
    print(f"{len(out['prompts'])} prompts -> {args.out}")


def sync(device: str) -> float:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    return time.perf_counter()


def timed(fn, prompts: list[list[int]], device: str) -> list[dict]:
    """fn(prompt) -> token ids, for each prompt; wall seconds end to end."""
    rows = []
    for i, p in enumerate(prompts):
        t0 = sync(device)
        ids = fn(p)
        rows.append({"seconds": sync(device) - t0, "tokens": len(ids), "token_ids": ids})
        print(f"  prompt {i}: {len(ids)} tokens, {len(ids) / rows[-1]['seconds']:.1f} tok/s",
              flush=True)
    return rows


def warm_up(fn, prompts: list[list[int]]) -> float:
    """Every prompt once, untimed, after the longest: each engine compiles, captures and
    caches whatever its prompt shapes need before the timed pass. Returns seconds."""
    t0 = time.perf_counter()
    for p in [max(prompts, key=len), *prompts]:
        fn(p)
    return time.perf_counter() - t0


def run_cospec(args, prompts) -> dict:
    """cospec's own loop; spd once per ``--draft-weights`` kind (its own weights first: the
    int8 copies replace them in place)."""
    from cospec.methods import MethodOptions, build_method
    from cospec.models import draft_weights, load_pair
    from cospec.sampling import GREEDY

    drafted = args.method in ("spd", "spd-staged")
    kinds = args.draft_weights.split(",") if drafted else ["model"]
    if kinds not in (["model"], ["int8"], ["model", "int8"]):  # before the models load
        raise SystemExit(f"--draft-weights {args.draft_weights}: model, int8 or model,int8")
    pair = load_pair(args.target, args.draft if drafted else None, device=args.device)
    configs = {}
    for kind in kinds:
        draft_weights(pair, kind)
        m = build_method(args.method, pair, MethodOptions(), GREEDY)

        def gen(p, m=m):  # no EOS: exactly args.new tokens
            return m.run(p, k=args.k, max_new_tokens=args.new, sampling=GREEDY, eos_ids=())[0]

        warm = warm_up(gen, prompts)
        name = "default" if kind == "model" else f"draft-{kind}"
        configs[name] = {"warmup_s": warm, "per_prompt": timed(gen, prompts, args.device)}
    return {"configs": configs}


def run_hf(args, prompts) -> dict:
    """transformers' generate in each supported configuration; every one is reported."""
    import torch
    from transformers import AutoModelForCausalLM, CompileConfig

    from cospec.models import resolve

    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16

    def load(spec):
        model = AutoModelForCausalLM.from_pretrained(str(resolve(spec)), dtype=dtype)
        model.generation_config.eos_token_id = None  # EOS does not stop (nor is it masked)
        return model.to(args.device).eval()

    target = load(args.target)
    draft = load(args.draft) if args.method == "spd" else None
    if args.method == "lookup":  # prompt lookup decoding (dynamic cache)
        configs = {"prompt-lookup": dict(prompt_lookup_num_tokens=args.k)}
    elif draft is not None:
        configs = {"assisted-default": dict(assistant_model=draft),
                   "assisted-constant-k": dict(assistant_model=draft,
                                               num_assistant_tokens=args.k,
                                               num_assistant_tokens_schedule="constant",
                                               assistant_confidence_threshold=0.0)}
    else:
        configs = {"static-compiled": dict(cache_implementation="static")}
        if args.eager:
            configs["eager-dynamic"] = {}
        if args.device == "cpu":  # generate compiles a static cache by itself on GPUs only
            compiled = CompileConfig(mode="default")  # CUDA graphs mean nothing on a CPU
            compiled._compile_all_devices = True
            configs["static-compiled"]["compile_config"] = compiled
            configs["static-eager"] = dict(cache_implementation="static", disable_compile=True)
    out = {}
    for name, kw in configs.items():
        def gen(p, kw=kw):
            x = torch.tensor([p], device=args.device)
            with torch.inference_mode():
                y = target.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                    max_new_tokens=args.new, pad_token_id=0, **kw)
            return y[0, len(p):].tolist()

        print(f"hf {name}: warm-up", flush=True)
        try:
            warm = warm_up(gen, prompts)  # compilation and graph capture, where it has them
            out[name] = {"warmup_s": warm, "kwargs": repr(kw),
                         "per_prompt": timed(gen, prompts, args.device)}
        except Exception as err:  # a configuration this version cannot run is reported
            out[name] = {"error": repr(err)[:500]}
            print(f"hf {name} failed: {err!r}", flush=True)
    return {"configs": out}


def run_vllm(args, prompts) -> dict:
    from vllm import LLM, SamplingParams

    from cospec.models import resolve

    kw = dict(model=str(resolve(args.target)), dtype="bfloat16", seed=0,
              enable_prefix_caching=False, max_model_len=2048, max_num_seqs=1,
              gpu_memory_utilization=0.6, skip_tokenizer_init=True)
    if args.method == "spd":
        kw["speculative_config"] = {"method": "draft_model", "model": str(resolve(args.draft)),
                                    "num_speculative_tokens": args.k}
    elif args.method == "lookup":  # n-grams of the prompt and output so far, no draft
        kw["speculative_config"] = {"method": args.vllm_ngram, "num_speculative_tokens": args.k,
                                    "prompt_lookup_max": 4}
    t0 = time.perf_counter()
    llm = LLM(**kw)
    start = time.perf_counter() - t0
    sp = SamplingParams(temperature=0.0, max_tokens=args.new, ignore_eos=True,
                        detokenize=False)

    def gen(p):
        out = llm.generate([{"prompt_token_ids": p}], sp, use_tqdm=False)
        return list(out[0].outputs[0].token_ids)

    warm = warm_up(gen, prompts)
    import vllm

    name = args.vllm_ngram if args.method == "lookup" else "default"
    res = {"configs": {name: {"engine_start_s": start, "warmup_s": warm,
                                   "per_prompt": timed(gen, prompts, "cuda"),
                                   "kwargs": {k: v for k, v in kw.items() if k != "model"}}},
           "vllm": vllm.__version__}
    try:  # speculative acceptance counters, where this version exposes them
        res["metrics"] = [{"name": m.name, "value": getattr(m, "value", None)}
                          for m in llm.get_metrics() if "spec" in m.name]
    except Exception as err:
        res["metrics_error"] = repr(err)[:200]
    return res


def run_llamacpp(args, prompts) -> dict:
    from peer_llamacpp import run

    from cospec.models import shipped_gguf

    def gguf(spec):
        return str(shipped_gguf(spec)) if not spec.endswith(".gguf") else spec

    res = run(prompts, args.new, gguf(args.target),
              gguf(args.draft) if args.method == "spd" else None, args.k, args.threads)
    return {"configs": {"default": res}}


ENGINES = {"cospec": run_cospec, "hf": run_hf, "vllm": run_vllm, "llamacpp": run_llamacpp}


def cmd_run(args) -> None:
    try:
        data = json.loads(Path(args.prompts).read_text())
        prompts = data["prompts"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        sys.exit(f"error: {args.prompts} is not a prompts file made by `peer_speed.py prompts` "
                 f"({err!r})")
    if args.threads and args.device == "cpu":
        import torch

        torch.set_num_threads(args.threads)
    before = machine()
    res = ENGINES[args.engine](args, prompts)
    res.update(engine=args.engine, method=args.method, k=args.k, new_tokens=args.new,
               device=args.device, prompts_file=str(args.prompts), ids=data["ids"],
               machine_start=before, machine_end=machine(),
               command="python " + " ".join(sys.argv))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res))
    for name, c in res["configs"].items():
        if "per_prompt" in c:
            print(f"{args.engine} {args.method} {name}: {aggregate(c['per_prompt']):.1f} tok/s")


def aggregate(rows: list[dict]) -> float:
    return sum(r["tokens"] for r in rows) / sum(r["seconds"] for r in rows)


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def check_comparable(runs: list[dict], names: list[str]) -> None:
    """Exit unless every run timed the same prompts (ids, in order) for the same new tokens,
    each configuration once a prompt, and every draft method at one k: the table pairs
    prompts by position and picks each engine's fastest configuration across files."""
    for key in ("ids", "new_tokens"):
        for r, name in zip(runs, names):
            if r.get(key) != runs[0].get(key):
                sys.exit(f"error: {name} timed {key} {r.get(key)!r}, {names[0]} "
                         f"{runs[0].get(key)!r}: a table compares runs of one prompts file "
                         "and one --new (put the others in another folder)")
    ks = {(r.get("k"), name) for r, name in zip(runs, names) if r.get("method") != "target"}
    if len({k for k, _ in ks}) > 1:
        sys.exit("error: draft methods timed at different k: "
                 + ", ".join(f"{name} k = {k}" for k, name in sorted(ks, key=str)))
    for r, name in zip(runs, names):
        n = len(r["ids"]) if r.get("ids") is not None else None
        for config, c in r["configs"].items():
            if "per_prompt" in c and n is not None and len(c["per_prompt"]) != n:
                sys.exit(f"error: {name} ({config}) timed {len(c['per_prompt'])} prompts of "
                         f"its {n}")


def cmd_table(args) -> None:
    folder = Path(args.dir)
    files = [f for f in sorted(folder.glob("*-*.json"))
             if f.name != "prompts.json" and f.name != "peers.json"]
    runs = [json.loads(f.read_text()) for f in files]
    check_comparable(runs, [f.name for f in files])
    best, tried = {}, {}
    for r in runs:  # each engine's fastest configuration per method, over all its files
        key = (r["engine"], r["method"])
        for n, c in r["configs"].items():  # a name two files share: the later one's number
            tried.setdefault(key, {})[n] = (aggregate(c["per_prompt"]) if "per_prompt" in c
                                            else c.get("error"))
            if "per_prompt" in c and (key not in best or aggregate(c["per_prompt"])
                                      > aggregate(best[key][1])):
                best[key] = (n, c["per_prompt"], r)
    ref = best.get(("cospec", "target"))
    rows, out = [], []
    for (engine, method), (config, per, r) in sorted(best.items()):
        row = {"engine": engine, "method": method, "config": config, "prompts": len(per),
               "tokens": sum(x["tokens"] for x in per), "seconds": sum(x["seconds"] for x in per),
               "tok_s": aggregate(per), "load_start": r["machine_start"]["load"][0],
               "load_end": r["machine_end"]["load"][0], "cpus": r["machine_start"]["cpus"],
               "all_configs": tried[(engine, method)]}
        if ref is not None:
            ratios = [(x["tokens"] / x["seconds"]) / (y["tokens"] / y["seconds"])
                      for x, y in zip(per, ref[1])]
            row["vs_cospec_target"] = row["tok_s"] / aggregate(ref[1])
            row["paired_ratio_q1_median_q3"] = quartiles(ratios)
            row["identical_to_cospec_target"] = sum(
                x.get("token_ids") == y["token_ids"] for x, y in zip(per, ref[1]))
        mine = best.get(("cospec", method))
        if mine is not None and engine != "cospec":
            row["cospec_vs_this"] = aggregate(mine[1]) / row["tok_s"]
            ratios = [(y["tokens"] / y["seconds"]) / (x["tokens"] / x["seconds"])
                      for x, y in zip(per, mine[1])]
            row["cospec_vs_this_paired_q1_median_q3"] = quartiles(ratios)
        out.append(row)
        q = row.get("paired_ratio_q1_median_q3")
        c = row.get("cospec_vs_this_paired_q1_median_q3")
        rows.append(
            f"| {engine} | {method} | {config} | {row['prompts']} | {row['tok_s']:.1f} | "
            + (f"{row['vs_cospec_target']:.2f}× | {q[1]:.2f} [{q[0]:.2f}, {q[2]:.2f}] | "
               f"{row['identical_to_cospec_target']}/{row['prompts']} | "
               if q else "— | — | — | ")
            + (f"{row['cospec_vs_this']:.2f}× (median {c[1]:.2f}) |" if c else "— |")
            + f" {row['load_start']:.2f} → {row['load_end']:.2f} ({row['cpus']} cores) |")
    (folder / "peers.json").write_text(json.dumps(out, indent=1))
    first = runs[0] if runs else {}
    md = [f"# Batch-1 speed beside peers: {first.get('machine_start', {}).get('gpu', 'CPU')}",
          "",
          f"{first.get('new_tokens')} new tokens per prompt (EOS does not stop), greedy, "
          f"k = {first.get('k')}, one request at a time, each engine in its own process; "
          "tok/s = total tokens ÷ total time (prefill included); paired ratio = per-prompt "
          "tok/s ÷ cospec target-only's on the same prompt (median [quartiles]); 'cospec ÷ "
          "this' = cospec's same method ÷ this engine's.", "",
          "| engine | method | config (fastest) | prompts | tok/s | ÷ cospec target | "
          "paired ratio | same tokens as cospec target | cospec ÷ this | load (1 min) |",
          "|---|---|---|---|---|---|---|---|---|---|", *rows, "",
          "Commands: " + "; ".join(f"`{r['command']}`" for r in runs)]
    (folder / "peers.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prompts")
    p.add_argument("--task", default="gsm8k", help="comma-separated tasks")
    p.add_argument("--n", type=int, default=10, help="first N problems of each task")
    p.add_argument("--tokenizer", default="qwen2.5-coder-1.5b")
    p.add_argument("--out", required=True)
    p = sub.add_parser("run")
    p.add_argument("--engine", choices=ENGINES, required=True)
    p.add_argument("--method", choices=("target", "spd", "spd-staged", "lookup"),
                   required=True, help="spd-staged: cospec only; lookup: not llamacpp")
    p.add_argument("--prompts", required=True)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--target", default="qwen2.5-coder-1.5b")
    p.add_argument("--draft", default="qwen2.5-coder-0.5b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: the default)")
    p.add_argument("--draft-weights", default="model",
                   help="cospec spd, spd-staged: model (its own weights), int8 (the "
                        "draft's steps read int8 copies, as `cospec eval --draft-weights "
                        "int8`) or model,int8 (both, each a configuration, timed in turn in "
                        "this one process; the table keeps the faster. Order in one process "
                        "can swap a 10-15 %% difference: for a choice between them, one kind "
                        "a process)")
    p.add_argument("--eager", action="store_true", help="hf: also time eager generate")
    p.add_argument("--vllm-ngram", choices=("ngram", "ngram_gpu"), default=None,
                   help="vllm lookup: its n-gram speculator on the CPU (ngram, the default) "
                        "or the GPU (ngram_gpu); the configuration's name in the table. Run "
                        "each into its own file: the table keeps the faster")
    p.add_argument("--out", required=True)
    p = sub.add_parser("table")
    p.add_argument("dir")
    args = ap.parse_args()
    if args.cmd == "run" and args.method == "spd-staged" and args.engine != "cospec":
        ap.error(f"--method spd-staged: cospec's own (not {args.engine}'s)")
    if args.cmd == "run" and args.method == "lookup" and args.engine == "llamacpp":
        ap.error("--method lookup: not timed for llamacpp")
    if args.cmd == "run" and args.vllm_ngram and (args.engine, args.method) != ("vllm", "lookup"):
        ap.error("--vllm-ngram: for --engine vllm --method lookup only")
    if args.cmd == "run" and args.vllm_ngram is None:
        args.vllm_ngram = "ngram"
    {"prompts": cmd_prompts, "run": cmd_run, "table": cmd_table}[args.cmd](args)


if __name__ == "__main__":
    main()
