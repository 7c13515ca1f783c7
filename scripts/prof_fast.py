"""Time one fast-path decode step (CUDA graph replay only) for Qwen2.5 shapes:
``python scripts/prof_fast.py SIZE [cdt]`` (cdt: inductor coordinate-descent tuning)."""

import sys
import time

import torch

sys.path.insert(0, "scripts")
from gpu_speed import SHAPES, random_model  # noqa: E402

from cospec import fast  # noqa: E402

size = sys.argv[1] if len(sys.argv) > 1 else ""
if size not in SHAPES or not torch.cuda.is_available():
    sys.exit(f"usage: python scripts/prof_fast.py {{{','.join(SHAPES)}}} [cdt]  (needs a GPU)")
if "cdt" in sys.argv[2:]:
    import torch._inductor.config as ic

    ic.coordinate_descent_tuning = True
model = random_model(size)
eng = fast.Engine(model, 512)
t0 = time.perf_counter()
eng.run(list(range(1000, 1100)), 0)
for n in (1, 6):
    eng.run([5] * n, 100)
print(size, sys.argv[2:], f"warm-up {time.perf_counter() - t0:.0f} s", flush=True)
for n in (1, 6):
    graph = eng.graphs[n][0]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(300):
        graph.replay()
    torch.cuda.synchronize()
    print(size, sys.argv[2:], f"n={n}: {(time.perf_counter() - t0) / 300 * 1e3:.3f} ms",
          flush=True)
