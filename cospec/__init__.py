"""cospec: collaborative speculative decoding (SPD, CoSpec, CoS) on Hugging Face causal LMs.

``cospec.load_pair()`` and the classes of ``cospec.api`` are imported on first use, so
``import cospec`` alone loads neither torch nor transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["API_METHODS", "CospecError", "Pair", "Result", "Stats", "Stream", "Token",
           "load_pair"]

if TYPE_CHECKING:
    from cospec.api import API_METHODS, Pair, Result, Stats, Stream, Token, load_pair
    from cospec.errors import CospecError


def __getattr__(name: str):
    if name == "CospecError":
        from cospec.errors import CospecError

        return CospecError
    if name in __all__:
        from cospec import api

        return getattr(api, name)
    raise AttributeError(f"module 'cospec' has no attribute {name!r}")
