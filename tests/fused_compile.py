"""Compile the fused kernels for an H100 / H200 (sm90) down to cubin, without a GPU.

``python tests/fused_compile.py [--quick]`` (triton imported uninterpreted, with its NVIDIA
backend): the launches ``cospec.fused`` makes for Qwen2.5-0.5B / 1.5B shapes are recorded on
meta tensors (nothing runs), then each is compiled by triton's own toolchain (ptxas
included), with the launch's num_warps / num_stages and the hints triton's launcher gives
(``hints``); ``--quick``: the 0.5B's decode step and 5-row verify only (every kernel, both
attention masks). Each case three times: split-K as an H200 gets it (``fused.split_k`` with
132 SMs) with the first weight block hoisted (HOIST = 1) and at most 128 registers a thread
(MAX_REGS); unsplit (every ``*_SPLIT_K`` = 1) without either; and split with every block of
an unrolled one-row reduction hoisted before a programmatic dependent launch's wait (HOIST =
2, PDL = 2), splits of up to 4 blocks loading their whole share first (SPLIT_EARLY = 4) and
the looped reductions reading their RMSNorm weights a block ahead (LN_AHEAD = 1) and the
attention's query heads in programs of at most 16 rows (ATTN_ROWS = 16); and at the
default settings with int8 weights (``fused.Int8``) and the int8 lm_head (Qwen2.5's 151,936
rows); a one-row case with the one-row tiles (GEMV = 1) every time.
``--usage``: also each launch's registers a thread, spilled bytes and shared memory (from
the cubin, by the ``cuobjdump`` triton ships), the programs that fit an SM at once (registers:
64 Ki a SM; shared memory: 227 KiB) and the waves its grid takes on 132 SMs, for the
default settings, on Qwen2.5-0.5B, 1.5B and 7B shapes at 1, 2 and 5 rows in bf16 (each distinct
launch once: o_proj and down_proj both run ``down_residual``; the attention masked by an
additive bias, as the reference path's shapes ask, is marked). ``--usage --int8``: the same
for the int8 weights' launches (the lm_head's included). NAME=VALUE arguments change
``cospec.fused``'s settings first (``fused.configure``; e.g. ``--usage GEMV=1``).
Exit status 0: all compiled; 77: triton or its NVIDIA backend is missing.
"""

import itertools
import math
import os
import subprocess
import sys
import tempfile

import torch

try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:
    sys.exit(77)

from cospec import fast, fused, kernels
from cospec.errors import CospecError

TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
         torch.int64: "i64", torch.int32: "i32", torch.int8: "i8"}
VOCAB = 151936  # Qwen2.5's: the int8 lm_head's rows
# (hidden, heads, kv heads, head_dim, intermediate, dtype, rows)
CASES = [(896, 14, 2, 64, 4864, torch.bfloat16, 1), (896, 14, 2, 64, 4864, torch.bfloat16, 5),
         (1536, 12, 2, 128, 8960, torch.float32, 16)]
USAGE_CASES = [(d, h, kvh, hd, inter, torch.bfloat16, n)  # Qwen2.5 0.5B, 1.5B, 7B; 1, 2, 5 rows
               for d, h, kvh, hd, inter in ((896, 14, 2, 64, 4864), (1536, 12, 2, 128, 8960),
                                            (3584, 28, 4, 128, 18944)) for n in (1, 2, 5)]


def record(cases: list[tuple], twins: bool = True, int8: bool = False) -> list[tuple]:
    """(kernel, positional args, constexprs, programs, case) of every launch of one fused layer
    per case; ``twins``: each case again unsplit, without HOIST and MAX_REGS, and split with
    HOIST = 2 under PDL = 2, and with int8 weights (``fused.Int8``) and the int8 lm_head at
    the default settings; ``int8`` without twins: int8 weights and lm_head only."""
    calls, case = [], None
    defaults = {name: getattr(fused, name) for name in fused.TUNABLE}

    class Launcher:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **consts: calls.append((self.fn, args, consts,
                                                          math.prod(grid), case))

    class Recorder:
        def __getattr__(self, name):
            return Launcher(getattr(kernels, name))

    fused._kernels = Recorder
    fused._hopper = lambda device: True  # meta tensors: launch as on an H100 / H200
    ways = ("split", "unsplit", "pdl", "int8") if twins else ("int8",) if int8 else ("",)
    for case, way in itertools.product(cases, ways):
        d, heads, kvh, hd, inter, dtype, n = case
        if way == "int8":
            fused.configure([f"{k}={v}" for k, v in defaults.items()])
        elif twins:
            for name in ("QKV_SPLIT_K", "OUT_SPLIT_K", "UP_SPLIT_K", "DOWN_SPLIT_K"):
                setattr(fused, name, 1 if way == "unsplit" else 0)
            fused.HOIST = {"split": 1, "unsplit": 0, "pdl": 2}[way]
            fused.PDL = 2 if way == "pdl" else 0
            fused.SPLIT_EARLY = 4 if way == "pdl" else 0
            fused.LN_AHEAD = int(way == "pdl")
            fused.ATTN_ROWS = 16 if way == "pdl" else 0
            fused.MAX_REGS = 0 if way == "unsplit" else 128
            fused.GEMV = 1  # one row: the one-row tiles (more rows cover the tl.dot path)

        def t(*shape, dt=dtype):
            return torch.empty(*shape, dtype=dt, device="meta")

        rows = (heads + 2 * kvh) * hd
        w = (t(d), t(rows, d), t(rows), None, None, t(d, heads * hd), None, t(d),
             t(2 * inter, d), t(d, inter))
        w8 = (tuple(fused.Int8(t(*w[i].shape, dt=torch.int8), t(len(w[i]), dt=torch.float32))
                    for i in fast.PROJECTIONS) if way == "int8" else None)
        x, pos = t(n, d), t(n, dt=torch.int64)
        kc, vc = t(kvh, 512, hd), t(kvh, 512, hd)
        q, _, _ = fused.rms_qkv_rope(x, t(512, hd), t(512, hd), w, heads, kvh, 1e-6,
                                     cache=(kc, vc, pos), w8=w8, rope_table=True)
        fused.attention_mlp(x, q, kc, vc, None, w, hd ** -0.5, 1e-6, pos=pos, w8=w8)
        if w8 is None:
            fused.attention_mlp(x, q, kc, vc, t(heads // kvh * n, 512), w, hd ** -0.5, 1e-6)
            fused.rms_norm(x, t(d), 1e-6)                           # the final norm
        else:
            fused.logits(x, fused.Int8(t(VOCAB, d, dt=torch.int8),
                                       t(VOCAB, dt=torch.float32)), None)
    fused.configure([f"{k}={v}" for k, v in defaults.items()])
    return calls


def signature(fn, args, consts) -> dict:
    sig = {}
    for name, a in zip(fn.arg_names, args):
        if isinstance(a, torch.Tensor):
            sig[name] = "*" + TYPES[a.dtype]
        elif isinstance(a, bool):
            sig[name] = "i1"
        elif isinstance(a, int):
            sig[name] = "i32"
        else:
            sig[name] = "fp32"
    return sig | dict.fromkeys(consts, "constexpr")


def hints(fn, args) -> dict:
    """The divisibility hints triton's launcher gives a launch (``attrs``): 16 for every
    tensor (torch's allocations are aligned) and every integer divisible by 16 that the kernel
    specialises on. Without them the compiler assumes unaligned pointers and loads 2-byte
    scalars, which changes registers and speed."""
    skip = set(fn.do_not_specialize)
    return {(i,): [["tt.divisibility", 16]] for i, (name, a) in enumerate(zip(fn.arg_names, args))
            if isinstance(a, torch.Tensor)
            or (type(a) is int and a % 16 == 0 and name not in skip and i not in skip)}


def resident(regs: int, shared: int, warps: int) -> int:
    """Programs of ``warps`` warps, ``regs`` registers a thread and ``shared`` bytes of shared
    memory that fit one sm90 SM at once: 64 Ki registers (a warp's taken in 256s), 227 KiB
    of shared memory (1 KiB reserved a program), 64 warps, 32 programs."""
    by_regs = 65536 // (-(-max(regs, 1) * 32 // 256) * 256 * warps)
    by_shared = (227 * 1024) // (shared + 1024)
    return min(by_regs, by_shared, 32, 64 // warps)


def usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED of a cubin's kernel (``cuobjdump -res-usage``)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    fields = dict(t.split(":") for t in out.split() if t.startswith(("REG:", "STACK:",
                                                                        "SHARED:")))
    return {k: int(v) for k, v in fields.items()}


def main() -> None:
    if not hasattr(triton.backends, "backends") or "nvidia" not in triton.backends.backends:
        sys.exit(77)
    target = GPUTarget("cuda", 90, 32)
    show = "--usage" in sys.argv
    try:
        fused.configure([a for a in sys.argv[1:] if "=" in a])  # NAME=VALUE: fused settings
    except CospecError as e:
        sys.exit(f"error: {e}")
    calls = record(USAGE_CASES if show else CASES[:2] if "--quick" in sys.argv else CASES,
                   twins=not show, int8="--int8" in sys.argv)
    seen = set()
    if show:
        print("| hidden, dtype | rows | kernel | programs | registers | spilled bytes | "
              "shared bytes | programs an SM | waves on 132 SMs |\n"
              "|---|---|---|---|---|---|---|---|---|")
    for fn, args, consts, programs, case in calls:
        options = {k: consts.pop(k) for k in ("num_warps", "num_stages", "maxnreg",
                                              "launch_pdl") if k in consts}
        src = ASTSource(fn, signature(fn, args, consts), constexprs=consts,
                        attrs=hints(fn, args))
        kernel = triton.compile(src, target=target, options=options)
        key = (fn.__name__, case, programs, tuple(sorted(consts.items())))
        if show and key not in seen:
            seen.add(key)
            use = usage(kernel.asm["cubin"])
            fit = resident(use["REG"], kernel.metadata.shared, options["num_warps"])
            name = fn.__name__ + (" (additive mask)" if consts.get("USE_POS") is False else
                                  " (int8)" if consts.get("W8") else "")
            print(f"| {case[0]}, {TYPES[case[5]]} | {case[6]} | {name} | {programs} | "
                  f"{use['REG']} | {use['STACK']} | {kernel.metadata.shared} | {fit} | "
                  f"{programs / (fit * fused.GPU_SMS):.2f} |")
    print(f"{len(calls)} launches compiled for sm90")


if __name__ == "__main__":
    main()
