"""Damaged or wrongly shaped files cospec reads (model files, the k-auto cache, results
folders) give a one-line CospecError naming the file, never a traceback."""

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cospec.cli import main
from cospec.errors import CospecError
from cospec.models import Pair, load_model, resolve


def tiny_gguf(path: Path) -> Path:
    """A small well-formed GGUF file: metadata (a string array among it) and two tensors."""
    import gguf

    w = gguf.GGUFWriter(path, "qwen2")
    w.add_block_count(1)
    w.add_token_list(["a", "b", "c"])
    w.add_tensor("token_embd.weight", np.ones((3, 8), dtype=np.float32))
    w.add_tensor("output.weight", np.ones((3, 8), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def cut(path: Path, n: int) -> None:
    path.write_bytes(path.read_bytes()[:n])


def test_a_whole_gguf_file_is_not_called_damaged(tmp_path):
    from cospec.models import gguf_damage

    path = tiny_gguf(tmp_path / "m.gguf")
    assert gguf_damage(path) is None
    cut(path, path.stat().st_size - 100)
    assert "gguf's reader" in gguf_damage(path)


@pytest.mark.parametrize("damage", ["random", "metadata", "tensors"])
def test_a_damaged_gguf_is_refused_and_leaves_no_cache_entry(tmp_path, monkeypatch, damage):
    monkeypatch.setenv("COSPEC_CACHE", str(tmp_path / "cache"))
    path = tiny_gguf(tmp_path / "m.gguf")
    if damage == "random":  # the magic, then noise: the version read is nonsense
        path.write_bytes(b"GGUF" + np.random.default_rng(0).bytes(5000))
    else:
        cut(path, 60 if damage == "metadata" else path.stat().st_size - 100)
    with pytest.raises(CospecError, match="damaged or truncated") as err:
        load_model(str(path), "cpu")
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert not list((tmp_path / "cache" / "models").glob("*"))


class FakeTokenizer:
    def __init__(self, fail: bool):
        self.fail = fail

    def save_pretrained(self, folder):
        (Path(folder) / "tokenizer.json").write_text("{")
        if self.fail:
            raise OSError("No space left on device")


@pytest.mark.parametrize("failure", ["load", "save"])
def test_a_failed_conversion_leaves_no_half_written_entry(tmp_path, monkeypatch, failure):
    """A conversion that fails (transformers refusing the file, the disk filling up while
    saving) leaves nothing in the cache: the next run converts again."""
    import transformers
    from tiny import tiny_model

    monkeypatch.setenv("COSPEC_CACHE", str(tmp_path / "cache"))
    path = tiny_gguf(tmp_path / "m.gguf")
    attempts = []

    def tokenizer_of(*args, **kw):
        attempts.append(args)
        return FakeTokenizer(fail=failure == "save" and len(attempts) == 1)

    def model_of(*args, **kw):
        if failure == "load" and len(attempts) == 1:
            raise ValueError("GGUF model with architecture qwen9 is not supported yet.")
        return tiny_model(1)

    monkeypatch.setattr(transformers, "AutoTokenizer",
                        SimpleNamespace(from_pretrained=tokenizer_of))
    monkeypatch.setattr(transformers, "AutoModelForCausalLM",
                        SimpleNamespace(from_pretrained=model_of))
    with pytest.raises((CospecError, OSError)) as err:
        resolve(str(path))
    if failure == "load":
        assert isinstance(err.value, CospecError) and "qwen9 is not supported" in str(err.value)
    assert not list((tmp_path / "cache" / "models").glob("*"))  # no entry, no .tmp folder
    out = resolve(str(path))
    assert len(attempts) == 2 and (out / "config.json").exists() and out.name.startswith("m-")


def test_a_truncated_safetensors_file_is_named(tmp_path, monkeypatch):
    """A folder's cut weights file is named; one in a converted cache entry says how to
    convert it again."""
    from tiny import save_tiny

    folder = save_tiny(tmp_path / "model", 1)
    weights = folder / "model.safetensors"
    cut(weights, weights.stat().st_size // 2)
    with pytest.raises(CospecError, match="save or download it again") as err:
        load_model(str(folder), "cpu")
    assert f"{weights} is damaged or truncated" in str(err.value)

    monkeypatch.setenv("COSPEC_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    key = hashlib.sha256(str(gguf.resolve()).encode()).hexdigest()[:12]
    entry = tmp_path / "cache" / "models" / f"m-{key}"
    shutil.copytree(folder, entry)
    with pytest.raises(CospecError, match="rerun to convert it again") as err:
        load_model(str(gguf), "cpu")
    assert f"{entry / 'model.safetensors'} is damaged" in str(err.value)
    assert f"delete {entry}" in str(err.value)


@pytest.mark.parametrize("bad", [
    {"target_s": "x"},
    {"target_s": {"1": 1.0}, "draft_s": 0.3},         # too few lengths timed
    {"target_s": {"1": "fast", "2": 1.0}, "draft_s": 0.3},
    {"target_s": {"1": 1.0, "2": 1.0}},               # no draft cost
    "x",
    None,                                             # the whole file a JSON array
])
def test_a_k_auto_cache_of_the_wrong_shape_is_timed_again(target, draft, tmp_path,
                                                          monkeypatch, bad):
    """As a k-auto.json that is not JSON: an entry not as auto_k writes it is timed again."""
    from cospec import k_auto

    monkeypatch.setenv("COSPEC_CACHE", str(tmp_path))
    timed = []

    def cost(model, n, prefix, reps, mode):
        timed.append(n)
        return 0.3 if model is draft else (1.0 if n <= 3 else 2.0)

    monkeypatch.setattr(k_auto, "forward_cost", cost)
    pair = Pair(target, draft, None, "t", "d")
    assert k_auto.auto_k(pair) == 2
    path = tmp_path / "k-auto.json"
    (key,) = json.loads(path.read_text())
    path.write_text(json.dumps([1] if bad is None else {key: bad}))
    assert k_auto.auto_k(pair) == 2
    assert len(timed) == 2 * (len(k_auto.AUTO_KS) + 1)
    assert json.loads(path.read_text())[key]["draft_s"] == 0.3


def results_folder(folder: Path) -> Path:
    """A finished bench folder of two problems written by hand (no model needed)."""
    from cospec.tasks import get_task

    folder.mkdir()
    ids = [p.id for p in get_task("gsm8k").problems("dev")[:2]]
    cfg = {"task": "gsm8k", "split": "dev", "k": 4, "max_new_tokens": 10, "temperature": 0.0,
           "methods": "target,spd", "limit": 2, "command": "cospec bench --task gsm8k"}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "speed.jsonl").write_text("".join(
        json.dumps({"id": i, "method": m, "token_ids": [1, 2], "peak_mem_gb": 1.0, "steps": 2,
                    "accepted": 0, "accepted_at": [], "arbiter_s": 0.0, "correct": False,
                    "generated": 2, "decode_s": 1.0, "prefill_s": 0.1}) + "\n"
        for i in ids for m in ("target", "spd")))
    return folder


def append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | changes))


@pytest.mark.parametrize("damage, says", [
    (lambda f: (f / "accuracy.jsonl").write_text('{"method": "target"}\n'),
     "accuracy.jsonl, line 1: no string 'id'"),
    (lambda f: append(f / "speed.jsonl", "[1]\n"),
     "speed.jsonl, line 5: a JSON array"),
    (lambda f: append(f / "speed.jsonl", '{"id": "x", "method": "spd", "correct": true}\n'),
     "speed.jsonl, line 5: no 'token_ids', no 'generated', no 'steps'"),
    (lambda f: (f / "config.json").write_text('["task", "methods"]'),
     "config.json holds a JSON array"),
    (lambda f: edit_config(f, methods=123), "config.json: 'methods' is 123"),
    (lambda f: edit_config(f, limit="2"), "config.json: 'limit' is \"2\""),
    (shutil.rmtree, "does not exist"),
], ids=["record-without-id", "record-array", "record-without-stats", "config-array",
        "methods-number", "limit-string", "no-folder"])
def test_summarize_names_the_file_that_is_wrong(tmp_path, capsys, damage, says):
    folder = results_folder(tmp_path / "run")
    assert main(["summarize", str(folder)]) == 0
    capsys.readouterr()
    damage(folder)
    assert main(["summarize", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {folder}") and says in err and err.count("\n") == 1


LOAD = {"time": "t", "load1": 0.5, "load5": 0.4, "load15": 0.3, "cpus": 2}


@pytest.mark.parametrize("load, says", [
    ("{not json", "speed_load.json is not valid JSON"),
    ("7", "speed_load.json, pass 1: a JSON number, not a"),
    (json.dumps([{"start": LOAD, "end": LOAD}, "x"]), "speed_load.json, pass 2: a JSON string"),
    (json.dumps({"start": LOAD, "end": [1]}), "pass 1: 'end': a JSON array, not an object"),
    (json.dumps([{"start": {"load1": 0.5}, "end": LOAD}]),
     "pass 1: 'start': no 'load5', no 'cpus'"),
    (json.dumps([{"start": LOAD, "end": LOAD | {"load1": "high", "cpus": None}}]),
     "pass 1: 'end': 'load1' is \"high\", not a number, 'cpus' is null, not a number"),
], ids=["not-json", "number", "pass-string", "end-array", "start-missing-keys", "wrong-types"])
def test_summarize_names_a_damaged_speed_load_file(tmp_path, capsys, load, says):
    folder = results_folder(tmp_path / "run")
    (folder / "speed_load.json").write_text(json.dumps([{"start": LOAD, "end": None}]))
    assert main(["summarize", str(folder)]) == 0  # a pass without its end is no damage
    capsys.readouterr()
    (folder / "speed_load.json").write_text(load)
    assert main(["summarize", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {folder}") and says in err and err.count("\n") == 1


def test_a_resumed_run_refuses_a_config_that_is_not_an_object(tmp_path):
    from cospec.evaluate import RunDir

    folder = results_folder(tmp_path / "run")
    (folder / "config.json").write_text("[]")
    with pytest.raises(CospecError, match="config.json holds a JSON array"):
        RunDir(folder, {"task": "gsm8k"})
