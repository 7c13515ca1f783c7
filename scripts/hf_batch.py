"""transformers' own batched ``generate`` on the prompts of ``scripts/bench_batch.py``, at several
batch sizes.

    python scripts/hf_batch.py --prompts FILE --out FILE.json [--target qwen2.5-coder-1.5b]
        [--new 256] [--batches 1,4,16,64] [--device cuda] [--no-compile] [--random 1.5b|7b]
    python scripts/hf_batch.py --tiny --prompts FILE --out FILE.json     # CPU smoke test

The side-by-side peer of ``bench_batch.py --ignore-eos --save-prompts FILE``, as
``scripts/vllm_batch.py`` is: the same prompt token ids, greedy, exactly ``--new`` new tokens
per request (EOS ignored), one process, the prompts handed over B at a time for each batch
size B, an untimed pass over the first group (and over the last, if it is smaller) before
each B, the JSON (vllm_batch.py's shape: ``runs`` of rows, generated, wall_s, tokens_per_s,
device_used_mb, plus peak_mb) written after every B.

transformers in its fastest configuration for this: a static KV cache
(``cache_implementation="static"``), whose decoding forward ``generate`` compiles by itself
on a GPU (``torch.compile`` with ``CompileConfig``'s default mode, ``reduce-overhead``: CUDA
graphs); on a CPU transformers does not compile and the static cache runs eagerly, as does
``--no-compile``. Every group is left-padded (attention mask 0) to the longest prompt of the
file, so all groups of a B share one shape and compile once, in the warm-up;
``torch._dynamo.reset()`` between batch sizes makes each B compile as a fresh process would.
Per B: peak memory (CUDA: the most allocated during the timed pass; CPU: the process's peak
resident set so far) and the device's memory in use after it (nvidia-smi).

Target-only. transformers' assisted generation (its draft-model speculation) refuses batches
of more than one sequence ("assisted generate is only supported for batch_size = 1", in
``GenerationMixin._assisted_decoding``), so it has no batched spd to measure; vLLM's is the
batched speculative peer. ``--random SIZE``: the random-weight target of Qwen2.5 shapes that
``bench_batch.py --random SIZE`` decodes (``gpu_speed.random_model``: same seed, bf16, CUDA),
on the prompts it saved with ``--save-prompts``: no weights to carry. ``--tiny``: a tiny
random model (fp32, CPU), prompt ids taken modulo its vocabulary: checks that the script
runs, measures nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from device_memory import gpu, peak_mb  # noqa: E402


def load(args) -> torch.nn.Module:
    """The target, EOS switched off (generation runs to ``--new`` tokens)."""
    if args.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny import tiny_model

        model = tiny_model(1, dtype=torch.float32)
    elif args.random:
        from gpu_speed import random_model

        model = random_model(args.random)
    else:
        from transformers import AutoModelForCausalLM

        from cospec.models import resolve

        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(str(resolve(args.target)), dtype=dtype)
    model.generation_config.eos_token_id = None
    return model.to(args.device).eval()


def padded(group: list[list[int]], width: int, pad: int, device: torch.device
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """ids, attention mask [len(group), width]: each prompt left-padded to ``width``."""
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in group], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=device)
    return ids, mask


def decode(model: torch.nn.Module, group: list[list[int]], width: int, pad: int,
           kw: dict) -> torch.Tensor:
    """One ``generate`` call over a group, left-padded to ``width``: new ids [len(group), n]."""
    ids, mask = padded(group, width, pad, next(model.parameters()).device)
    with torch.inference_mode():
        return model.generate(ids, attention_mask=mask, **kw)[:, width:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--target", default="qwen2.5-coder-1.5b")
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-compile", action="store_true", help="static cache, run eagerly")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model on CPU (smoke)")
    ap.add_argument("--random", choices=("0.5b", "1.5b", "7b"),
                    help="bench_batch.py --random's random-weight target (CUDA)")
    args = ap.parse_args()
    if args.random and (args.tiny or not torch.cuda.is_available()):
        ap.error("--random builds its model on a CUDA GPU (--tiny: the CPU smoke test)")
    if not args.prompts.is_file():
        ap.error(f"--prompts {args.prompts}: no such file (bench_batch.py --save-prompts "
                 "writes it)")
    if args.tiny:
        args.device = "cpu"
    import transformers

    t0 = time.perf_counter()
    model = load(args)
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    prompts = json.loads(args.prompts.read_text())
    if args.tiny:
        prompts = [[t % vocab for t in p] for p in prompts]
    width = max(map(len, prompts))
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    kw = dict(do_sample=False, max_new_tokens=args.new, pad_token_id=pad,
              cache_implementation="static", disable_compile=args.no_compile)
    report = dict(engine="hf", transformers=transformers.__version__, torch=torch.__version__,
                  method="target", new=args.new, k=None, prompts=len(prompts),
                  target="tiny" if args.tiny else f"random-{args.random}" if args.random
                  else args.target, device=str(device),
                  dtype=str(next(model.parameters()).dtype), padded_to=width,
                  compiled=device.type == "cuda" and not args.no_compile,
                  engine_start_s=time.perf_counter() - t0,
                  kwargs=dict(kw), gpu=gpu("name"),
                  load_start=os.getloadavg(), command="python " + " ".join(sys.argv), runs=[])

    def run(group: list[list[int]]) -> int:
        return decode(model, group, width, pad, kw).numel()

    for b in (int(x) for x in args.batches.split(",")):
        groups = [prompts[i:i + b] for i in range(0, len(prompts), b)]
        torch._dynamo.reset()  # this B compiles afresh, in its warm-up
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            for g in {len(g): g for g in (groups[0], groups[-1])}.values():
                run(g)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            t0, tokens = time.perf_counter(), 0
            for g in groups:
                tokens += run(g)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            wall = time.perf_counter() - t0
        except Exception as err:  # e.g. out of memory at this B: reported, the next B runs
            report["runs"].append(dict(rows=b, method="target", error=repr(err)[:500]))
            print(f"hf B={b:3d} failed: {err!r}"[:300], flush=True)
        else:
            report["runs"].append(dict(rows=b, method="target", generated=tokens, wall_s=wall,
                                       tokens_per_s=tokens / wall, peak_mb=peak_mb(device),
                                       device_used_mb=float(gpu("memory.used") or "nan") if
                                       device.type == "cuda" else None))
            print(f"hf B={b:3d} target {tokens / wall:9.1f} tok/s "
                  f"peak {report['runs'][-1]['peak_mb']:8.0f} MiB", flush=True)
        report["load_end"] = os.getloadavg()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
