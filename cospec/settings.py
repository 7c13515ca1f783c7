"""Settings read from the environment (``COSPEC_*``) that take one of a fixed set of values.

Each is read where it is used (``cpu.linear_mode``, ``fast.prefill_mode``, ``fused.mode``,
``fast_batch.run_ahead_setting``); ``cli.check_settings`` reads them all once, so that the
command line names a bad value at start, also in a run that would never read it (a CPU run
never reads COSPEC_PREFILL).
"""

from __future__ import annotations

import os

from cospec.errors import CospecError


def choice(name: str, values: tuple[str, ...], default: str) -> str:
    """Setting ``name``: one of ``values``; unset or empty: ``default``. Any other value is a
    CospecError naming the accepted ones."""
    value = os.environ.get(name, "") or default
    if value not in values:
        raise CospecError(f"{name}={value!r}: use one of {', '.join(values)} "
                          f"(unset: {default})")
    return value

