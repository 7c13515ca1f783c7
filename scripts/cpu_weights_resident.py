"""What a CPU decode step costs with weights in the checkpoint's memory map and out of it.

    PYTHONPATH=. python scripts/cpu_weights_resident.py [--model qwen2.5-coder-1.5b]

Loads the model with transformers' ``from_pretrained`` alone (float32: its safetensors
weights stay memory-mapped), times a 120-token prefill, the median one-token step and a
three-token forward (``cpu_dtype_cost.forward_ms``), then copies the weights into the
process's memory (``cospec.models.resident``, which ``load_model`` does on a CPU) and times
them twice more. Prints the three lines.
"""

from __future__ import annotations

import argparse

import torch
from cpu_dtype_cost import forward_ms
from transformers import AutoModelForCausalLM

from cospec.models import DEFAULT_TARGET, resident, resolve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_TARGET)
    args = ap.parse_args()
    model = AutoModelForCausalLM.from_pretrained(str(resolve(args.model)),
                                                 dtype=torch.float32).eval()
    print("mapped", forward_ms(model, 120, 15), flush=True)
    resident(model)
    print("resident", forward_ms(model, 120, 15), flush=True)
    print("resident, again", forward_ms(model, 120, 15), flush=True)


if __name__ == "__main__":
    main()
