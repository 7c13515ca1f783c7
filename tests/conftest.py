import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import save_tiny, tiny_model  # noqa: E402


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
