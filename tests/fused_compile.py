"""Compile the fused kernels for an H100 / H200 (sm90) down to cubin, without a GPU.

``python tests/fused_compile.py [--quick]`` (triton imported uninterpreted, with its NVIDIA
backend): the launches ``cospec.fused`` makes for Qwen2.5-0.5B / 1.5B shapes are recorded on
meta tensors (nothing runs), then each is compiled by triton's own toolchain (ptxas
included), with the launch's num_warps / num_stages; ``--quick``: the 0.5B's 5-row verify
only (every kernel, both attention masks). Each case twice: split-K as an H200 gets it
(``fused.split_k`` with 132 SMs) with the first weight block hoisted (HOIST = 1) and at most
128 registers a thread (MAX_REGS), and unsplit (every ``*_SPLIT_K`` = 1) without either.
Exit status 0: all compiled; 77: triton or its NVIDIA backend is missing.
"""

import itertools
import sys

import torch

try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:
    sys.exit(77)

from cospec import fused, kernels

TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
         torch.int64: "i64", torch.int32: "i32"}
# (hidden, heads, kv heads, head_dim, intermediate, dtype, rows)
CASES = [(896, 14, 2, 64, 4864, torch.bfloat16, 1), (896, 14, 2, 64, 4864, torch.bfloat16, 5),
         (1536, 12, 2, 128, 8960, torch.float32, 16)]


def record(cases: list[tuple]) -> list[tuple]:
    """(kernel, positional args, constexprs) of every launch of one fused layer per case."""
    calls = []

    class Launcher:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **consts: calls.append((self.fn, args, consts))

    class Recorder:
        def __getattr__(self, name):
            return Launcher(getattr(kernels, name))

    fused._kernels = Recorder
    for (d, heads, kvh, hd, inter, dtype, n), unsplit in itertools.product(cases, (False, True)):
        for name in ("QKV_SPLIT_K", "OUT_SPLIT_K", "UP_SPLIT_K", "DOWN_SPLIT_K"):
            setattr(fused, name, 1 if unsplit else 0)
        fused.HOIST = 0 if unsplit else 1
        fused.MAX_REGS = 0 if unsplit else 128
        def t(*shape, dt=dtype):
            return torch.empty(*shape, dtype=dt, device="meta")

        rows = (heads + 2 * kvh) * hd
        w = (t(d), t(rows, d), t(rows), None, None, t(d, heads * hd), None, t(d),
             t(2 * inter, d), t(d, inter))
        x, pos = t(n, d), t(n, dt=torch.int64)
        kc, vc = t(kvh, 512, hd), t(kvh, 512, hd)
        q, _, _ = fused.rms_qkv_rope(x, t(n, hd), t(n, hd), w, heads, kvh, 1e-6,
                                     cache=(kc, vc, pos))
        fused.attention_mlp(x, q, kc, vc, None, w, hd ** -0.5, 1e-6, pos=pos)
        fused.attention_mlp(x, q, kc, vc, t(heads // kvh * n, 512), w, hd ** -0.5, 1e-6)
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


def main() -> None:
    if not hasattr(triton.backends, "backends") or "nvidia" not in triton.backends.backends:
        sys.exit(77)
    target = GPUTarget("cuda", 90, 32)
    calls = record(CASES[1:2] if "--quick" in sys.argv else CASES)
    for fn, args, consts in calls:
        options = {k: consts.pop(k) for k in ("num_warps", "num_stages", "maxnreg")
                   if k in consts}
        src = ASTSource(fn, signature(fn, args, consts), constexprs=consts)
        triton.compile(src, target=target, options=options)
    print(f"{len(calls)} launches compiled for sm90")


if __name__ == "__main__":
    main()
