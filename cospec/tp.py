"""Tensor parallelism for the target: N ranks (torchrun processes) each hold 1/N of its weights.

Rank r of N runs ``cospec.fast``'s functional forward over its shard (gpt-fast / Megatron
layout), with collectives inside the step:

- attention: query heads r*H/N.. and kv heads r*KVH/N..: q/k/v are column-parallel (this
  rank's rows of the stacked weight), o_proj row-parallel (this rank's input columns); the
  partial outputs are summed by one all-reduce. The KV cache holds this rank's kv heads only.
- MLP: gate/up column-parallel (intermediate columns r*I/N..), down_proj row-parallel, one
  all-reduce. A bias of a row-parallel layer lives on rank 0 only (it is added once).
- embedding and lm_head: vocabulary rows r*S..(r+1)*S, S = ceil(V/N), the last shard padded
  with zero rows. A token's embedding comes from the rank that holds its row (the others
  contribute zeros to an all-reduce, so the sum is exact); the logits are gathered
  (all_gather) to the full [n, V] on every rank, which is what the acceptance rules read.
- norms and rotary tables are replicated.

The collectives are functional (``torch.distributed._functional_collectives``), so a step can
be compiled and captured in a CUDA graph like the single-GPU one. Every rank runs the same
decode loop on the same inputs (the draft whole on every rank, the same seeds, the same
gathered logits), so every rank takes the same decisions; only rank 0 prints or writes.

Entry points: ``init(tp, device)`` joins the torchrun process group (a collective that
waits longer than the timeout, e.g. for a rank that died, raises ``CospecError``);
``load_pair`` loads the draft whole and the target as this rank's shard, reading only its
slices of the safetensors files; ``wrap_target`` shards a model already in memory.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed import _functional_collectives as funcol

from cospec import fast
from cospec.errors import CospecError

# all_gather_tensor is all_gather_single in newer torch (same arguments)
_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
TIMEOUT_S = 300.0  # a collective waiting longer than this ends the run (a rank died or hangs)

# (name, dim, start, stop) -> that slice of the named tensor; dim None: the whole tensor
Read = Callable[[str, int | None, int, int], torch.Tensor]


def init(tp: int, device: str | None = None, timeout_s: float = TIMEOUT_S) -> str:
    """Join the process group of ``tp`` ranks that torchrun started (NCCL on GPUs, gloo on
    CPUs); returns this rank's device: ``cuda:LOCAL_RANK``, or ``cpu``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tp < 1 or world != tp:
        raise CospecError(f"--tp {tp} needs {tp} processes, found {world}: launch with "
                          f"torchrun --nproc-per-node {tp} -m cospec ... --tp {tp}")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if cuda and local >= torch.cuda.device_count():
        raise CospecError(f"rank {local} has no GPU: {torch.cuda.device_count()} visible")
    rank_device = f"cuda:{local}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s),
                                device_id=torch.device(rank_device) if cuda else None)
    return rank_device


def is_main() -> bool:
    """Rank 0, or no process group: the process that prints and writes results."""
    return not dist.is_initialized() or dist.get_rank() == 0


def finish() -> None:
    """Leave the process group (at the end of a run)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _rows(rank: int, size: int) -> tuple[int, int]:
    return rank * size, (rank + 1) * size


class ShardedLM(torch.nn.Module):
    """This rank's shard of a Llama-family target, with the HF model's ``config`` and
    ``generation_config``. It has no forward of its own: ``cospec.fast`` runs it with a
    ``TPEngine`` (``decoding.cached_lm`` picks one through ``engine_class``)."""

    def __init__(self, config, read: Read, names: set[str], rotary: torch.nn.Module,
                 device: str | torch.device, dtype: torch.dtype, generation_config=None):
        super().__init__()
        self.config, self.generation_config = config, generation_config
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.group = dist.group.WORLD.group_name  # the collectives' group, by name
        cfg, n = config, self.world
        heads, kv_heads, hd = fast.attention_shape(cfg)
        inter = cfg.intermediate_size
        if heads % n or kv_heads % n or inter % n:
            raise CospecError(f"cannot split the target over {n} ranks: {heads} heads, "
                              f"{kv_heads} kv heads and MLP width {inter} must all be "
                              f"divisible by {n}")
        self.heads, self.kv_heads = heads // n, kv_heads // n
        self.vocab = cfg.vocab_size
        rows = math.ceil(self.vocab / n)
        self.vocab_start = self.rank * rows

        def get(name: str, dim: int | None = None, start: int = 0, stop: int = 0):
            return read(name, dim, start, stop).to(device, dtype).contiguous()

        def part(name: str, dim: int, size: int) -> torch.Tensor:
            return get(name, dim, *_rows(self.rank, size))

        def opt(name: str, fn: Callable[[str], torch.Tensor]) -> torch.Tensor | None:
            return fn(name) if name in names else None

        def vocab_rows(name: str) -> torch.Tensor:
            stop = min(self.vocab, self.vocab_start + rows)
            t = get(name, 0, self.vocab_start, stop)
            return F.pad(t, (0, 0, 0, rows - t.shape[0]))  # zero rows past the vocabulary

        with torch.inference_mode(False), torch.no_grad():
            self.embed = vocab_rows("model.embed_tokens.weight")
            self.norm = get("model.norm.weight")
            tied = (getattr(cfg, "tie_word_embeddings", False) or "lm_head.weight" not in names)
            self.head_w = self.embed if tied else vocab_rows("lm_head.weight")
            self.head_b = opt("lm_head.bias", vocab_rows)
            self.layers = []
            q, kv, mlp = self.heads * hd, self.kv_heads * hd, inter // n
            for i in range(cfg.num_hidden_layers):
                p = f"model.layers.{i}."
                a, m = p + "self_attn.", p + "mlp."
                qkv_w = torch.cat([part(a + "q_proj.weight", 0, q),
                                   part(a + "k_proj.weight", 0, kv),
                                   part(a + "v_proj.weight", 0, kv)])
                qkv_b = None
                if a + "q_proj.bias" in names:
                    qkv_b = torch.cat([part(a + "q_proj.bias", 0, q),
                                       part(a + "k_proj.bias", 0, kv),
                                       part(a + "v_proj.bias", 0, kv)])
                o_b = opt(a + "o_proj.bias", get) if self.rank == 0 else None
                gate_up = torch.cat([part(m + "gate_proj.weight", 0, mlp),
                                     part(m + "up_proj.weight", 0, mlp)])
                self.layers.append((
                    get(p + "input_layernorm.weight"), qkv_w, qkv_b,
                    opt(a + "q_norm.weight", get), opt(a + "k_norm.weight", get),
                    part(a + "o_proj.weight", 1, q), o_b,
                    get(p + "post_attention_layernorm.weight"), gate_up,
                    part(m + "down_proj.weight", 1, mlp)))
        self.rotary = rotary.to(device)
        unique = {id(t): t for w in self.layers for t in w if t is not None}
        for t in (self.embed, self.norm, self.head_w, self.head_b):
            if t is not None:
                unique[id(t)] = t
        self.shards = torch.nn.ParameterList(
            torch.nn.Parameter(t, requires_grad=False) for t in unique.values())

    @property
    def engine_class(self) -> type:
        return TPEngine


class TPEngine(fast.Engine):
    """``fast.Engine`` over a ``ShardedLM``: the same forward, with this rank's heads and MLP
    columns, the embedding summed and the logits gathered over the ranks."""

    def _weights(self, model: ShardedLM) -> torch.nn.Module:
        self.heads, self.kv_heads, self.group = model.heads, model.kv_heads, model.group
        self.vocab, self.vocab_start = model.vocab, model.vocab_start
        self.embed, self.norm = model.embed, model.norm
        self.head_w, self.head_b, self.layers = model.head_w, model.head_b, model.layers
        return model.rotary

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        mine = (local >= 0) & (local < self.embed.shape[0])
        x = F.embedding(local.clamp(0, self.embed.shape[0] - 1), self.embed)
        return fast._sum(torch.where(mine[:, None], x, 0), self.group)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        part = F.linear(h, self.head_w, self.head_b)                          # [n, V/N]
        return funcol.wait_tensor(_gather(part, 1, self.group))[:, :self.vocab]  # [n, V]

    def run(self, ids: list[int] | torch.Tensor, start: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return super().run(ids, start)
        except RuntimeError as err:  # gloo reports a lost peer as a plain RuntimeError
            if not (isinstance(err, dist.DistError) or "gloo" in str(err)
                    or "NCCL" in str(err)):
                raise
            raise CospecError(f"tensor-parallel rank {dist.get_rank()}: a collective failed "
                              f"(another rank died, or waited past the timeout): "
                              f"{str(err).splitlines()[0]}") from None


def wrap_target(model: torch.nn.Module) -> ShardedLM:
    """This rank's shard of ``model`` (whole in memory, the same on every rank): copies of
    its slices, so the full model can be dropped afterwards."""
    _check(model)
    state = dict(model.state_dict())

    def read(name: str, dim: int | None, start: int, stop: int) -> torch.Tensor:
        t = state[name]
        return t if dim is None else t.narrow(dim, start, stop - start)

    p = next(model.parameters())
    return ShardedLM(model.config, read, set(state), model.model.rotary_emb, p.device, p.dtype,
                     getattr(model, "generation_config", None))


def _skeleton(config) -> torch.nn.Module:
    """The HF model of ``config`` on the meta device: its parameter names and shapes, its
    rotary embedding class; no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _check(model: torch.nn.Module) -> None:
    if not fast.supported(model):
        kind = getattr(getattr(model, "config", None), "model_type", None)
        raise CospecError(f"tensor parallelism supports {', '.join(fast.FAMILIES)} models "
                          f"with full attention and a SiLU MLP, not this {kind} model")


def _rotary(skeleton: torch.nn.Module) -> torch.nn.Module:
    with torch.device("cpu"):
        return type(skeleton.model.rotary_emb)(config=skeleton.config)


def _checkpoint(folder: Path) -> tuple[Read, set[str]]:
    """A reader of slices of the safetensors files in ``folder`` (one file or an index):
    only the requested slice is read from disk."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.exists():
        where = {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise CospecError(f"{folder} has no .safetensors weights: tensor parallelism "
                              "reads its slices from safetensors files")
        where = {}
        for path in files:
            with safe_open(str(path), "pt") as f:
                where.update(dict.fromkeys(f.keys(), path))
    opened: dict[Path, object] = {}

    def read(name: str, dim: int | None, start: int, stop: int) -> torch.Tensor:
        path = where[name]
        if path not in opened:
            opened[path] = safe_open(str(path), "pt")
        piece = opened[path].get_slice(name)
        if dim is None:
            return piece[:]
        return piece[(slice(None),) * dim + (slice(start, stop),)]

    return read, set(where)


def load_target(spec: str, device: str, dtype: torch.dtype | None = None):
    """``(shard, tokenizer)``: this rank's shard of the model ``spec`` (see
    ``models.resolve``), read slice by slice from its safetensors files: an N-way shard
    needs 1/N of the model's memory (plus the replicated norms)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from cospec.models import default_dtype, resolve

    dtype = dtype or default_dtype(device)
    folder = resolve(spec)
    try:
        config = AutoConfig.from_pretrained(str(folder))
        tok = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as err:
        raise CospecError(f"could not load a causal LM from {spec}: {err}") from None
    try:
        gen = GenerationConfig.from_pretrained(str(folder))
    except OSError:
        gen = None
    skeleton = _skeleton(config)
    _check(skeleton)
    read, names = _checkpoint(folder)
    return ShardedLM(config, read, names, _rotary(skeleton), device, dtype, gen), tok


def load_pair(target: str, draft: str | None, device: str, dtype: torch.dtype | None = None):
    """``models.Pair`` with the draft whole on this rank and the target as this rank's shard
    (``init`` first)."""
    from cospec.models import (
        Pair,
        check_same_vocab,
        common_output_rows,
        cut_output_layer,
        load_model,
    )

    t_model, t_tok = load_target(target, device, dtype)
    d_model = None
    if draft is not None:
        d_model, d_tok = load_model(draft, device, dtype)
        check_same_vocab(t_tok, d_tok, target, draft)
        # one output width for both (as models.share_output_width): the target's gathered
        # logits are cut to the shared rows (ShardedEngine._logits), a wider draft's layer
        widths = {target: t_model.vocab, draft: d_model.get_output_embeddings().weight.shape[0]}
        t_model.vocab = common_output_rows(widths, len(t_tok))
        cut_output_layer(draft, d_model, t_model.vocab, len(t_tok))
    return Pair(t_model, d_model, t_tok, target, draft)


# Qwen2.5 shapes (config.json of the released models), for step timings on random weights
SHAPES = {
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, vocab_size=152064),
    "72b": dict(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8, vocab_size=152064),
}


def random_target(shape: dict, device: str, dtype: torch.dtype, seed: int = 0) -> ShardedLM:
    """This rank's shard of a Qwen2 of ``shape`` with random weights, made on the device
    slice by slice (the whole model never exists anywhere)."""
    from transformers import Qwen2Config

    config = Qwen2Config(rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768,
                         use_sliding_window=False, tie_word_embeddings=False, **shape)
    skeleton = _skeleton(config)
    shapes = {k: v.shape for k, v in skeleton.state_dict().items()}
    gen = torch.Generator(device).manual_seed(seed + dist.get_rank())

    def read(name: str, dim: int | None, start: int, stop: int) -> torch.Tensor:
        size = list(shapes[name])
        if dim is not None:
            size[dim] = stop - start
        if name.endswith("norm.weight"):
            return torch.ones(size, device=device, dtype=dtype)
        return torch.empty(size, device=device, dtype=dtype).normal_(0, 0.02, generator=gen)

    return ShardedLM(config, read, set(shapes), _rotary(skeleton), device, dtype)


def step_bytes(model: ShardedLM, cached: int) -> int:
    """HBM bytes one rank reads in a decode step after ``cached`` tokens: its weights (the
    input embedding only by the rows it looks up, so not at all) and its K/V cache."""
    weights = {id(t): t for w in model.layers for t in w if t is not None}
    weights.update({id(t): t for t in (model.norm, model.head_w, model.head_b)
                    if t is not None})
    size = sum(t.numel() * t.element_size() for t in weights.values())
    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * model.kv_heads * hd * cached * model.norm.element_size()
    return size + kv


def _bench(args) -> dict:
    """Median seconds of a forward over n tokens after ``args.prefix`` cached ones, for each
    n of ``args.tokens``, on a random-weight shard of ``args.shape``."""
    import statistics
    import time

    device = init(args.tp, "cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    model = random_target(SHAPES[args.shape], device, dtype)
    longest = max(args.tokens)
    fast_path = device != "cpu" and not args.eager
    engine = TPEngine(model, args.prefix + longest + 1, graphs=fast_path, compile=fast_path)
    ids = torch.randint(100, 5000, (args.prefix + longest,)).tolist()

    def clock() -> float:
        if device != "cpu":
            torch.cuda.synchronize()
        return time.perf_counter()

    rows = {}
    with torch.inference_mode():
        engine.run(ids[:args.prefix], 0)
        for n in args.tokens:
            times = []
            for rep in range(args.warmup + args.reps):
                t0 = clock()
                engine.run(ids[args.prefix:args.prefix + n], args.prefix)
                if rep >= args.warmup:
                    times.append(clock() - t0)
            rows[n] = {"median_s": statistics.median(times), "min_s": min(times),
                       "max_s": max(times), "reps": args.reps}
    bytes_ = step_bytes(model, args.prefix)
    roofline = bytes_ / args.bandwidth
    for row in rows.values():
        row["roofline_ratio"] = row["median_s"] / roofline
    return {"shape": args.shape, "config": SHAPES[args.shape], "tp": args.tp,
            "dtype": args.dtype, "prefix": args.prefix, "graphs": engine.use_graphs,
            "compiled": engine.compiled, "capture_s": engine.capture_s,
            "device": torch.cuda.get_device_name() if device != "cpu" else "cpu",
            "torch": torch.__version__, "bytes_per_rank_step": bytes_,
            "bandwidth_bytes_per_s": args.bandwidth, "roofline_s": roofline,
            "steps": {str(n): row for n, row in rows.items()}}


def main(argv: list[str] | None = None) -> int:
    """``torchrun --nproc-per-node N -m cospec.tp --tp N --shape 72b --out FILE``: step times
    of a random-weight target shard at the shapes of ``--shape`` (rank 0 writes the JSON)."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m cospec.tp", description=main.__doc__)
    p.add_argument("--tp", type=int, required=True)
    p.add_argument("--shape", choices=sorted(SHAPES), required=True)
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--prefix", type=int, default=512, help="tokens already cached")
    p.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=[1, 5],
                   help="forward lengths to time, e.g. 1,5 (a step; a verify of k=4)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--bandwidth", type=float, default=4.8e12,
                   help="HBM bytes/s of one GPU for the roofline (H200 SXM: 4.8e12)")
    p.add_argument("--eager", action="store_true", help="no CUDA graphs, no torch.compile")
    p.add_argument("--out", required=True, help="JSON file (written by rank 0)")
    args = p.parse_args(argv)
    try:
        result = _bench(args)
        if is_main():
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
            print(json.dumps(result["steps"]))
        return 0
    except CospecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        finish()


if __name__ == "__main__":
    raise SystemExit(main())
