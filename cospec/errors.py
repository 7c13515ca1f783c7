"""The one exception type the command line turns into a clear message (never a traceback),
the reading of the JSON files cospec keeps beside its results, and the check that a folder
can be written before long work, both of which raise it."""

import json
import tempfile
from pathlib import Path


class CospecError(Exception):
    """A user-facing error: bad input, a missing file, a mismatched model pair, ...

    The CLI prints ``error: <message>`` and exits with status 2.
    """


def read_json(path: str | Path) -> dict:
    """The object in JSON file ``path`` (a run's config.json, a collection's meta.json);
    CospecError naming the file if it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CospecError(f"{path} is not valid JSON ({err}); fix it, or delete its folder "
                          "to start fresh") from None


def check_writable(folder: str | Path, what: str) -> None:
    """Refuse (CospecError, ``what`` naming the flag) a ``folder`` that files cannot be
    written in: one that is not a folder, or whose nearest existing folder (where the rest
    would be made) is not one or takes no new file. Makes and leaves nothing: for a check
    before minutes of model loading or training, which make the folder when they write."""
    base = Path(folder)
    while not base.exists() and not base.is_symlink() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise CospecError(f"{what}: {base} is not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=base, prefix=".cospec-write-check-"):
            pass
    except OSError as err:
        raise CospecError(f"{what}: cannot write files in {base} "
                          f"({err.strerror or err})") from None
