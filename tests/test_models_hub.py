"""Model specs that are Hugging Face hub ids, loaded offline from a hub-style cache folder
(``models--org--name/snapshots/<rev>/...`` with ``refs/main``) as transformers finds them."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cospec.errors import CospecError
from cospec.models import is_hub_id, resolve

REV = "0123456789abcdef0123456789abcdef01234567"


def cache_model(cache: Path, repo_id: str, folder: Path) -> None:
    """Lay ``folder``'s files out as the hub cache holds a download of ``repo_id``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / REV)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REV)


@pytest.fixture(scope="module")
def hub(tiny_dirs, tmp_path_factory):
    """An offline environment whose hub cache holds tiny-org/target and tiny-org/draft, and
    tiny-org/other-vocab (a different vocabulary)."""
    from tiny import save_tiny

    root = tmp_path_factory.mktemp("hf")
    cache = root / "hub"
    cache_model(cache, "tiny-org/target", tiny_dirs[0])
    cache_model(cache, "tiny-org/draft", tiny_dirs[1])
    cache_model(cache, "tiny-org/other-vocab", save_tiny(root / "other", 3, vocab=280))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(root), HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1",
               COSPEC_CACHE=str(root / "cospec"))
    return env


def cli(env, *args):
    return subprocess.run([sys.executable, "-m", "cospec", *args], capture_output=True,
                          text=True, timeout=300, env=env)


@pytest.mark.parametrize("spec, hub_id", [
    ("Qwen/Qwen2.5-7B-Instruct", True), ("gpt2", True), ("org/name.v1_x", True),
    ("/abs/path", False), ("./rel", False), ("a/b/c", False), ("org/../etc", False),
    ("model.gguf", False), ("", False),
])
def test_hub_id_spelling(spec, hub_id):
    assert is_hub_id(spec) is hub_id


def test_resolve_keeps_a_hub_id_and_refuses_a_missing_path(tiny_dirs):
    assert resolve("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
    assert resolve(str(tiny_dirs[0])) == tiny_dirs[0]
    with pytest.raises(CospecError, match="model not found"):
        resolve("/no/such/model")


def test_hub_ids_load_offline_from_the_cache(hub, tiny_dirs):
    """The pair named by hub ids decodes exactly as the same pair named by folders."""
    from cospec import load_pair

    res = cli(hub, "generate", "--target", "tiny-org/target", "--draft", "tiny-org/draft",
              "--method", "spd", "--prompt", "the answer", "--no-chat", "--max-new-tokens",
              "12", "--json")
    assert res.returncode == 0, res.stderr
    ids = json.loads(res.stdout)["token_ids"]
    by_folder = load_pair(str(tiny_dirs[0]), str(tiny_dirs[1]), "cpu", "float32")
    expected = by_folder.generate("the answer", chat=False, max_new_tokens=12).token_ids
    assert len(ids) > 0 and ids == expected


@pytest.mark.parametrize("target, draft, message", [
    ("tiny-org/missing", "tiny-org/draft", "not in the Hugging Face cache"),
    ("tiny-org/target", "tiny-org/other-vocab", "different vocabularies"),
])
def test_hub_id_errors_are_clear(hub, target, draft, message):
    res = cli(hub, "generate", "--target", target, "--draft", draft, "--prompt", "w5",
              "--no-chat")
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
