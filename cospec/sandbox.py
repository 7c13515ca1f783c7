"""Running untrusted generated code: a subprocess in a throwaway folder, with limits.

Each program runs as ``python -I`` in a fresh temporary directory, in its own process group
(killed whole on timeout, so forks and infinite loops cannot hang the caller), under
resource limits (memory, CPU, processes, file size), with sockets disabled, and — when we
run as root — as user ``nobody``, so it cannot write outside its directory.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

NOBODY = 65534
GUARD = """\
import builtins as _b, os as _o, socket as _s
def _no_network(*a, **k):
    raise OSError("network access is disabled in the cospec sandbox")
_s.socket = _s.create_connection = _s.socketpair = _no_network
_home = _o.path.realpath(_o.getcwd())
def _inside(p):
    return _o.path.realpath(p).startswith(_home + _o.sep)
_open = _b.open
def _guarded_open(file, mode="r", *a, **k):
    if any(c in mode for c in "wax+") and not _inside(file):
        raise PermissionError(f"the cospec sandbox may not write {file}")
    return _open(file, mode, *a, **k)
_b.open = _guarded_open
def _guard(f):
    def g(p, *a, **k):
        if not _inside(p):
            raise PermissionError(f"the cospec sandbox may not change {p}")
        return f(p, *a, **k)
    return g
for _n in ("remove", "unlink", "rmdir", "mkdir", "makedirs", "rename", "replace", "chmod",
           "removedirs", "truncate"):
    setattr(_o, _n, _guard(getattr(_o, _n)))
def _no_exec(*a, **k):
    raise PermissionError("the cospec sandbox may not start programs")
_o.system = _o.popen = _o.execv = _o.execve = _no_exec
del _b, _s, _n
"""


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: str        # "passed" | "failed" | "timeout"
    stderr_tail: str


def _limits(memory_mb: int, cpu_s: int, drop: bool):
    def apply():
        mem = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
        resource.setrlimit(resource.RLIMIT_FSIZE, (10 * 2**20, 10 * 2**20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if drop:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
        resource.setrlimit(resource.RLIMIT_NPROC, (64, 64))
    return apply


def _nobody_can_run(exe: str) -> bool:
    """Whether user nobody can reach and run the interpreter (every parent o+x)."""
    path = os.path.realpath(exe)
    parts = [path] + [os.path.dirname(path)]
    while parts[-1] != "/":
        parts.append(os.path.dirname(parts[-1]))
    return all(os.stat(p).st_mode & 0o001 for p in parts)


def run_python(program: str, timeout: float = 10.0, memory_mb: int = 1024) -> SandboxResult:
    """Run ``program``; passed iff it exits 0 within ``timeout`` seconds.

    The Python-level guard (no sockets, no writes or deletions outside the folder, no
    os.system) always applies; as root, the program also runs as user nobody where that
    user can reach the interpreter — an OS-level barrier the guard alone is not.
    """
    drop = os.geteuid() == 0 and _nobody_can_run(sys.executable)
    with tempfile.TemporaryDirectory(prefix="cospec-sandbox-") as tmp:
        path = os.path.join(tmp, "prog.py")
        with open(path, "w") as f:
            f.write(GUARD + program)
        if drop:
            os.chown(tmp, NOBODY, NOBODY)
            os.chown(path, NOBODY, NOBODY)
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"}
        proc = subprocess.Popen([sys.executable, "-I", path], cwd=tmp, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True,
                                preexec_fn=_limits(memory_mb, int(timeout) + 1, drop))
        try:
            _, err = proc.communicate(timeout=timeout)
            status = "passed" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            status, err = "timeout", b""
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the whole group: children too
            proc.wait()
    return SandboxResult(status == "passed", status, err.decode(errors="replace")[-2000:])
