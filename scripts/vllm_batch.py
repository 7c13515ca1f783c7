"""vLLM's offline throughput on the prompts of ``scripts/bench_batch.py``, at several batch sizes.

    python scripts/vllm_batch.py --prompts FILE --method target|spd|lookup --out FILE.json
        [--target qwen2.5-coder-1.5b] [--draft qwen2.5-coder-0.5b] [--new 256] [--k 4]
        [--batches 1,4,16,64]

The side-by-side peer of ``bench_batch.py --ignore-eos --save-prompts FILE``: the same prompt
token ids, greedy, exactly ``--new`` new tokens per request (EOS ignored), the same k
(``lookup``: vLLM's n-gram speculator, as ``peer_speed.py`` configures it). One
process per method (run this script once per method); its engine admits up to the largest
batch size, and a batch size B is measured by handing the prompts over B at a time: with
every request exactly ``--new`` tokens long the requests of a group start and end together,
as B slots of a continuously batched engine would run them. Each B gets an untimed pass
over its first group first. Per B: generated tokens, wall seconds, tokens/s, and the GPU
memory in use on the device (nvidia-smi; vLLM reserves ``gpu_memory_utilization`` of the
device for weights and its KV pool up front, so this is what it holds, not what a batch
needs). Writes the JSON after every B. This process itself never touches CUDA (vLLM's
engine runs in its own process).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from device_memory import gpu  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", required=True, type=Path)
    ap.add_argument("--method", choices=("target", "spd", "lookup"), required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--target", default="qwen2.5-coder-1.5b")
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b")
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.6)
    args = ap.parse_args()
    if not args.prompts.is_file():
        ap.error(f"--prompts {args.prompts}: no such file (bench_batch.py --save-prompts "
                 "writes it)")

    import vllm
    from vllm import LLM, SamplingParams

    from cospec.models import resolve

    prompts = json.loads(args.prompts.read_text())
    batches = [int(b) for b in args.batches.split(",")]
    longest = max(map(len, prompts)) + args.new + args.k + 8
    kw = dict(model=str(resolve(args.target)), dtype="bfloat16", seed=0,
              enable_prefix_caching=False, max_model_len=max(2048, longest),
              max_num_seqs=max(batches), gpu_memory_utilization=args.gpu_memory_utilization,
              skip_tokenizer_init=True)
    if args.method == "spd":
        kw["speculative_config"] = {"method": "draft_model", "model": str(resolve(args.draft)),
                                    "num_speculative_tokens": args.k}
    elif args.method == "lookup":
        kw["speculative_config"] = {"method": "ngram", "num_speculative_tokens": args.k,
                                    "prompt_lookup_max": 4}
    t0 = time.perf_counter()
    llm = LLM(**kw)
    report = dict(engine="vllm", vllm=vllm.__version__, method=args.method, new=args.new,
                  k=args.k, prompts=len(prompts), engine_start_s=time.perf_counter() - t0,
                  kwargs={k: v for k, v in kw.items() if k != "model"},
                  gpu=gpu("name"), load_start=os.getloadavg(),
                  command="python " + " ".join(sys.argv), runs=[])
    sp = SamplingParams(temperature=0.0, max_tokens=args.new, min_tokens=args.new,
                        ignore_eos=True, detokenize=False)

    def run(group: list[list[int]]) -> int:
        outs = llm.generate([{"prompt_token_ids": p} for p in group], sp, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    for b in batches:
        run(prompts[:b])
        t0, tokens = time.perf_counter(), 0
        for i in range(0, len(prompts), b):
            tokens += run(prompts[i:i + b])
        wall = time.perf_counter() - t0
        report["runs"].append(dict(rows=b, method=args.method, generated=tokens, wall_s=wall,
                                   tokens_per_s=tokens / wall,
                                   device_used_mb=float(gpu("memory.used") or "nan")))
        report["load_end"] = os.getloadavg()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        print(f"vllm B={b:3d} {args.method:6s} {tokens / wall:9.1f} tok/s", flush=True)
    try:  # speculative acceptance counters, where this version exposes them
        report["metrics"] = [{"name": m.name, "value": getattr(m, "value", None)}
                             for m in llm.get_metrics() if "spec" in m.name]
    except Exception as err:
        report["metrics_error"] = repr(err)[:200]
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
