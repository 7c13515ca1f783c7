"""Memory figures the throughput scripts report (bench_batch, hf_batch, vllm_batch)."""

from __future__ import annotations

import resource
import subprocess


def gpu(field: str) -> str:
    """One nvidia-smi field of GPU 0, e.g. ``memory.used`` (MiB) or ``name`` (empty without
    nvidia-smi or a GPU)."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}",
                              "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, check=False).stdout
    except OSError:
        return ""
    return out.splitlines()[0].strip() if out else ""


def peak_mb(device) -> float:
    """MiB at peak: CUDA, the device's most allocated since its last reset; CPU, this
    process's peak resident set so far."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
