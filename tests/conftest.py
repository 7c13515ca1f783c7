import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny import save_tiny, tiny_model  # noqa: E402

# tiny models: intra-op threads only add overhead (and oversubscribe a busy machine)
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # and in the CLI subprocesses


@pytest.fixture(autouse=True)
def settings_left_as_found():
    """Every test leaves the COSPEC_* settings as it found them (``monkeypatch.setenv``
    undoes its own): one left set switches the paths of every later test (COSPEC_STATIC=1
    sends the CPU tests to the static engines instead of the plain cache)."""
    before = {k: v for k, v in os.environ.items() if k.startswith("COSPEC_")}
    yield
    after = {k: v for k, v in os.environ.items() if k.startswith("COSPEC_")}
    assert after == before, f"COSPEC_* settings changed by the test: {before} -> {after}"


@pytest.fixture
def interpret():
    """The fused layers' CPU tests: triton's interpreter on CPU tensors, which must be asked
    for in the environment the process starts with (TRITON_INTERPRET=1, see
    test_fused.py); skipped otherwise."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tests need TRITON_INTERPRET=1 in the environment at start")


@pytest.fixture(scope="session")
def target():
    return tiny_model(1)


@pytest.fixture(scope="session")
def draft():
    return tiny_model(2, layers=1)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """A tiny target and draft saved as Hugging Face folders (shared word-level tokenizer)."""
    root = tmp_path_factory.mktemp("models")
    return save_tiny(root / "target", 1), save_tiny(root / "draft", 2, layers=1)
