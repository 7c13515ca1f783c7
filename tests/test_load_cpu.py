"""Loading on a CPU (``cospec.models.load_model``): the weights the decode steps stream."""

from __future__ import annotations

import torch


def test_cpu_weights_live_in_the_process_not_in_the_checkpoints_map(tmp_path):
    """``load_model`` on a CPU copies the weights out of transformers' memory map of the
    safetensors file (``models.resident``): rewriting the file on disk afterwards leaves the
    loaded model as it was (a mapped weight would follow the file's pages)."""
    from tiny import save_tiny

    from cospec.models import load_model

    folder = save_tiny(tmp_path / "m", 3)
    model, _ = load_model(str(folder), "cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.tensor([[5, 9, 12]])
    with torch.inference_mode():
        want = model(ids).logits
    (weights,) = folder.glob("*.safetensors")
    with open(weights, "r+b") as f:  # the same bytes' places, zeros from past the header
        header = 8 + int.from_bytes(f.read(8), "little")
        f.seek(header)
        f.write(bytes(weights.stat().st_size - header))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, want)
