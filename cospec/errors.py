"""The one exception type the command line turns into a clear message (never a traceback)."""


class CospecError(Exception):
    """A user-facing error: bad input, a missing file, a mismatched model pair, ...

    The CLI prints ``error: <message>`` and exits with status 2.
    """
