"""Both models' last hidden states at already collected divergence points (GPU job).

The divergence data (``cospec collect``) stores scalar features only. This recomputes each
training problem's target-greedy trajectory (batched lockstep, as collection did), runs both
models once over prompt + trajectory, and keeps

- ``points.safetensors``: ``target_hidden`` [N, d_t], ``draft_hidden`` [N, d_d] (float16) at
  the state that predicts each point's token, and ``valid`` [N] (the recomputed trajectory
  has the point's target token there: batched numerics can differ between runs);
- ``probe.safetensors``: the target's hidden state every ``--stride`` generated tokens of
  every trajectory with the problem's label (was the target's final answer right?), for a
  correctness probe.

Point order = ``cospec.collect.read_points(data)`` order.

    python scripts/hidden_at_points.py --data data/divergences-gsm8k-dev --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from cospec.batched import lockstep
from cospec.collect import read_points
from cospec.decoding import LastHidden
from cospec.methods import encode_prompt, eos_ids
from cospec.models import load_pair
from cospec.tasks import get_task


@torch.inference_mode()
def hidden_rows(model, ids: list[int]) -> torch.Tensor:
    """Last hidden states [len(ids), d] of one sequence (float16, on the CPU)."""
    device = next(model.parameters()).device
    with LastHidden(model) as h:
        model(input_ids=torch.tensor([ids], device=device), logits_to_keep=0)
    return h.value[0].half().cpu()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--stride", type=int, default=8)
    a = ap.parse_args()
    meta = json.loads((Path(a.data) / "meta.json").read_text())
    points = read_points([a.data])
    pair = load_pair(meta["target"], meta["draft"], a.device, None)
    task = get_task(meta["task"])
    problems = {p.id: p for p in task.problems(meta["split"])}
    ids = sorted({p["id"] for p in points}, key=list(problems).index)
    tok = pair.tokenizer
    prompts = [encode_prompt(tok, problems[i].prompt) for i in ids]
    eos = eos_ids(tok, pair.target)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    paths = lockstep(pair.target, None, prompts, max_new_tokens=meta["max_new_tokens"],
                     eos_ids=eos, pad_id=pad, batch_size=a.batch_size, desc="trajectories")
    label = {p["id"]: p["target_correct"] for p in points}
    by_id: dict[str, list[int]] = {}
    for n, p in enumerate(points):
        by_id.setdefault(p["id"], []).append(n)
    d_t, d_d = pair.target.config.hidden_size, pair.draft.config.hidden_size
    th = torch.zeros(len(points), d_t, dtype=torch.float16)
    dh = torch.zeros(len(points), d_d, dtype=torch.float16)
    valid = torch.zeros(len(points), dtype=torch.bool)
    probe_h, probe_y, probe_pid, probe_pos = [], [], [], []
    for j, (pid, prompt, path) in enumerate(tqdm(list(zip(ids, prompts, paths)),
                                                 desc="hidden states")):
        seq = prompt + path.tokens
        ht, hd = hidden_rows(pair.target, seq), hidden_rows(pair.draft, seq)
        base = len(prompt) - 1  # row base + i predicts generated token i
        for n in by_id[pid]:
            pos = points[n]["position"]
            if pos < len(path.tokens):
                th[n], dh[n] = ht[base + pos], hd[base + pos]
                valid[n] = path.tokens[pos] == points[n]["t"]
        rows = list(range(0, len(path.tokens), a.stride))
        probe_h.append(ht[[base + i for i in rows]])
        probe_y += [float(label[pid])] * len(rows)
        probe_pid += [j] * len(rows)
        probe_pos += rows
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    info = {"data": a.data, "target": meta["target"], "draft": meta["draft"],
            "problems": ids, "points": len(points), "valid": int(valid.sum()),
            "stride": a.stride}
    save_file({"target_hidden": th, "draft_hidden": dh, "valid": valid},
              str(out / "points.safetensors"), metadata={"info": json.dumps(info)})
    save_file({"hidden": torch.cat(probe_h), "label": torch.tensor(probe_y),
               "problem": torch.tensor(probe_pid), "position": torch.tensor(probe_pos)},
              str(out / "probe.safetensors"), metadata={"info": json.dumps(info)})
    (out / "info.json").write_text(json.dumps(info, indent=1))
    print(f"{int(valid.sum())}/{len(points)} points matched the recomputed trajectories; "
          f"{sum(len(h) for h in probe_h)} probe rows -> {out}")


if __name__ == "__main__":
    main()
