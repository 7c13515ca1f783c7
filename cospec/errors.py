"""The one exception type the command line turns into a clear message (never a traceback),
and the reading of the JSON files cospec keeps beside its results, which raises it."""

import json
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
