"""Running untrusted generated code: a pass means the program's tests ran to their end.

Each program runs in a fresh Python interpreter under a small driver (``DRIVER``). The driver
sets resource limits, reads a random per-run secret and the program from its stdin, closes
stdin and points stdout at /dev/null, runs the program with ``exec`` (a ``SystemExit`` or any
other exception is a failure), and only then writes the secret to the stdout it kept, and
leaves with ``os._exit(0)``. The grader counts a pass only if the exit status is 0 AND the
exact secret came back, so exiting early (``sys.exit(0)``, ``os._exit(0)``, an ``atexit`` or
``sys.excepthook`` that exits 0) cannot pass: the secret is never in argv, the environment
or any file the program can read. (It is in the driver's memory, which a program written
against this grader could read: docs/grading.md states the limits.)

Two boundaries, chosen by ``use`` (the CLI's ``--sandbox``):

- ``bwrap``: bubblewrap. New mount, pid, network, ipc, uts and cgroup namespaces, no
  capabilities, no new privileges, only /usr (+ the /lib-style links) and the interpreter's
  prefixes bound read-only, fresh /proc and minimal /dev, private size-limited tmpfs folders
  (``/work``, the cwd, and ``/tmp``). Run as root, the program becomes user nobody on the
  host (so RLIMIT_NPROC holds and nothing root-owned is writable); otherwise a user namespace
  is added. Every process of the run dies with its pid namespace.
- ``process``: the fallback where bwrap is missing or cannot make namespaces. A plain
  subprocess in its own session and a throwaway folder, as user nobody when we are root
  (through ``setpriv``), with a Python-level guard against writes outside the folder,
  sockets, new processes and signals. Code that goes around Python (ctypes) escapes it.

``kind()`` says which one grades (record it beside every graded result).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import warnings
from dataclasses import dataclass

from cospec.errors import CospecError

MODES = ("auto", "bwrap", "process")
NOBODY = 65534
FSIZE = 10 * 2**20        # largest file (and captured output) a program may write, bytes
TMPFS = 64 * 2**20        # size of each private tmpfs folder under bwrap, bytes
NPROC = 64                # processes + threads of the sandbox user
# A run's wall-clock allowance is its CPU-second limit (``timeout``) times this: a program
# that waits (sleep, a blocking read) is cut at WALL_SLACK x timeout, while one that needs
# its CPU seconds on a machine whose cores are shared (grading threads beyond the cores,
# other jobs) still gets them: passing depends on the program, not on the machine's load.
WALL_SLACK = 3

# The Python-level guard of the process fallback: installed by the driver after it has taken
# what it needs (os.write, os._exit) and before the program runs.
GUARD = r'''
def _guard():
    import builtins, io, os, posix, socket, _socket, _posixsubprocess
    home = os.path.realpath(os.getcwd())
    def inside(p):
        if isinstance(p, int):
            return False
        return os.path.realpath(os.fsdecode(p)).startswith(home + os.sep)
    def refuse(what):
        def no(*a, **k):
            raise PermissionError(f"the cospec sandbox does not allow {what}")
        return no
    for mod, name in ((socket, "socket"), (socket, "create_connection"),
                      (socket, "socketpair"), (socket, "fromfd"), (_socket, "socket"),
                      (_socket, "socketpair")):
        setattr(mod, name, refuse("network access"))
    real_open = io.open
    def open_(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+") and not inside(file):
            raise PermissionError(f"the cospec sandbox may not write {file!r}")
        return real_open(file, mode, *a, **k)
    builtins.open = io.open = open_
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    real_osopen = os.open
    def osopen(path, flags, *a, **k):
        if (flags & writes or k.get("dir_fd") is not None) and not inside(path):
            raise PermissionError(f"the cospec sandbox may not write {path!r}")
        return real_osopen(path, flags, *a, **k)
    def paths(f, n):
        def g(*a, **k):
            if any(k.get(d) is not None for d in ("dir_fd", "src_dir_fd", "dst_dir_fd")):
                raise PermissionError("the cospec sandbox does not allow dir_fd")
            for p in a[:n]:
                if not inside(p):
                    raise PermissionError(f"the cospec sandbox may not change {p!r}")
            return f(*a, **k)
        return g
    for mod in (os, posix):
        mod.open = osopen
        for name, n in (("remove", 1), ("unlink", 1), ("rmdir", 1), ("mkdir", 1),
                        ("chmod", 1), ("chown", 1), ("lchown", 1), ("truncate", 1),
                        ("utime", 1), ("mkfifo", 1), ("mknod", 1), ("rename", 2),
                        ("replace", 2), ("link", 2), ("symlink", 2)):
            if hasattr(mod, name):
                setattr(mod, name, paths(getattr(mod, name), n))
        for name in ("system", "popen", "fork", "forkpty", "vfork", "setsid", "setpgid",
                     "kill", "killpg", "execv", "execve", "posix_spawn", "posix_spawnp",
                     "spawnv", "spawnve", "spawnvp", "spawnvpe", "register_at_fork"):
            if hasattr(mod, name):
                setattr(mod, name, refuse(f"os.{name}"))
    _posixsubprocess.fork_exec = refuse("new processes")
_guard()
del _guard
'''

DRIVER = r'''
import os, resource, sys, traceback
def _main(mem, cpu, drop, guard):
    write, _exit = os.write, os._exit
    for lim, v in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu),
                   (resource.RLIMIT_FSIZE, {fsize}), (resource.RLIMIT_CORE, 0),
                   (resource.RLIMIT_NPROC, {nproc})):
        resource.setrlimit(lim, (v, v))
    if drop and os.getuid() == 0:
        os.setgroups([])
        os.setgid({nobody})
        os.setuid({nobody})
    data = bytearray()
    while chunk := os.read(0, 1 << 16):
        data += chunk
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    out = os.dup(1)
    os.dup2(null, 1)
    os.close(null)
    secret, _, source = bytes(data).partition(b"\n")
    del data, chunk
    path = os.path.abspath("prog.py")
    with open(path, "wb") as f:
        f.write(source)
    if guard:
        exec(guard, {{}})
    try:
        exec(compile(source, path, "exec"), {{"__name__": "solution", "__file__": path}})
    except BaseException:
        try:
            traceback.print_exc()
            sys.stderr.flush()
        finally:
            _exit(1)
    write(out, secret)
    _exit(0)
_main({mem}, {cpu}, {drop}, {guard!r})
'''


@dataclass(frozen=True)
class SandboxResult:
    passed: bool       # exit 0 and the run's secret came back: the program ran to its end
    status: str        # "passed" | "failed" | "timeout"
    stderr_tail: str   # last 2,000 characters of the program's stderr
    kind: str          # "bwrap" | "process": the boundary it ran in


_lock = threading.Lock()
_mode = "auto"
_probe: tuple[bool, str] | None = None   # (bwrap works here, why not)
_warned = False


def use(mode: str) -> None:
    """Choose the sandbox: ``auto`` (bwrap where it works, else the process fallback with one
    warning), ``bwrap`` (required: CospecError here if it cannot run) or ``process``."""
    global _mode
    if mode not in MODES:
        raise CospecError(f"unknown sandbox {mode!r}; choose from {', '.join(MODES)}")
    if mode == "bwrap" and not bwrap_works()[0]:
        raise CospecError(f"--sandbox bwrap: bubblewrap cannot run here ({bwrap_works()[1]}); "
                          "install it (apt-get install bubblewrap) where namespaces are "
                          "allowed, or choose --sandbox process")
    _mode = mode


def kind() -> str:
    """``"bwrap"`` or ``"process"``: the sandbox that grades now under the chosen mode."""
    global _warned
    if _mode == "process":
        return "process"
    ok, why = bwrap_works()
    if ok:
        return "bwrap"
    with _lock:
        if not _warned:
            _warned = True
            who = ("user nobody" if _runs_as_nobody()
                   else f"the current user ({pwd.getpwuid(os.geteuid()).pw_name})")
            warnings.warn(f"bubblewrap is unavailable ({why}); generated code is graded in a "
                          f"plain subprocess as {who}, guarded only at the Python level "
                          "(install bubblewrap for an OS-level boundary)", stacklevel=2)
    return "process"


def bwrap_works() -> tuple[bool, str]:
    """Whether bwrap can run a program here (probed once per process), and why not."""
    global _probe
    with _lock:
        if _probe is None:
            if shutil.which("bwrap") is None:
                _probe = (False, "no bwrap on PATH")
            else:
                res = _run("pass", 30.0, 1024, "bwrap")
                lines = res.stderr_tail.strip().splitlines()
                _probe = (res.passed, lines[-1] if lines else res.status)
        return _probe


def run_python(program: str, timeout: float = 10.0, memory_mb: int = 1024) -> SandboxResult:
    """Run ``program`` in the sandbox ``kind()``; passed iff it ran to its end (no exception,
    no exit) within ``timeout`` seconds of CPU time (RLIMIT_CPU), ``WALL_SLACK * timeout``
    seconds of wall-clock time and ``memory_mb`` of address space."""
    return _run(program, timeout, memory_mb, kind())


def _runs_as_nobody() -> bool:
    return os.geteuid() == 0 and shutil.which("setpriv") is not None


def _nobody_can_run(exe: str) -> bool:
    """Whether user nobody can reach and run the interpreter (every parent o+x)."""
    path = os.path.realpath(exe)
    parts = [path]
    while parts[-1] != "/":
        parts.append(os.path.dirname(parts[-1]))
    return all(os.stat(p).st_mode & 0o001 for p in parts)


def _python_dirs() -> list[str]:
    """The folders the interpreter and its libraries live in, outside /usr, outermost only."""
    found = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))),
             *sysconfig.get_paths().values()}
    dirs = sorted(os.path.realpath(d) for d in found if os.path.isdir(d))
    out: list[str] = []
    for d in dirs:
        if d == "/usr" or d.startswith("/usr/") or any(d.startswith(o + "/") for o in out):
            continue
        out.append(d)
    return out


def _bwrap_args(info_fd: int) -> list[str]:
    """bwrap's arguments up to the command (see the module docstring for what they make)."""
    root = os.geteuid() == 0
    args = [shutil.which("bwrap") or "bwrap", "--die-with-parent", "--new-session",
            "--cap-drop", "ALL"]
    if root:  # no user namespace: the driver drops to the host's nobody, then has no caps
        args += ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
                 "--unshare-cgroup-try", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-all"]
    args += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    private = ("/tmp", "/work")  # mounted before the binds: a venv inside them stays seen
    for folder in private:
        args += ["--perms", "01777", "--size", str(TMPFS), "--tmpfs", folder]
    made: set[str] = set(private)
    for d in _python_dirs():
        parent, parents = os.path.dirname(d), []
        while parent != "/" and parent not in made:
            parents.append(parent)
            parent = os.path.dirname(parent)
        for p in reversed(parents):
            args += ["--perms", "0755", "--dir", p]
            made.add(p)
        args += ["--ro-bind", d, d]
    return args + ["--proc", "/proc", "--dev", "/dev", "--chdir", "/work",
                   "--info-fd", str(info_fd), "--"]


def _run(program: str, timeout: float, memory_mb: int, where: str) -> SandboxResult:
    secret = secrets.token_hex(16).encode()
    jail = where == "bwrap"
    driver = DRIVER.format(fsize=FSIZE, nproc=NPROC, nobody=NOBODY, mem=memory_mb * 2**20,
                           cpu=int(timeout) + 1, drop=jail, guard=None if jail else GUARD)
    python = [sys.executable, "-I", "-B", "-c", driver]
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(tempfile.TemporaryFile())
        err = stack.enter_context(tempfile.TemporaryFile())
        info_r = info_w = -1
        if jail:
            info_r, info_w = os.pipe()
            stack.callback(os.close, info_r)
            cmd, cwd = _bwrap_args(info_w) + python, None
            home = "/work"
        else:
            cwd = home = stack.enter_context(tempfile.TemporaryDirectory(prefix="cospec-sb-"))
            cmd = python
            if _runs_as_nobody():
                os.chown(cwd, NOBODY, NOBODY)
                caps = ([] if _nobody_can_run(sys.executable) else
                        ["--inh-caps", "+dac_read_search", "--ambient-caps", "+dac_read_search"])
                cmd = [shutil.which("setpriv") or "setpriv", "--reuid", str(NOBODY),
                       "--regid", str(NOBODY), "--clear-groups", "--no-new-privs", *caps,
                       *python]
        env = {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"}
        try:
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=out,
                                    stderr=err, start_new_session=True,
                                    pass_fds=(info_w,) if jail else ())
        finally:
            if jail:
                os.close(info_w)
        pidfd = _sandbox_init(info_r) if jail else None
        status = "failed"
        try:
            proc.communicate(secret + b"\n" + program.encode(), timeout=WALL_SLACK * timeout)
        except subprocess.TimeoutExpired:
            status = "timeout"
        finally:
            _end(proc, pidfd)
        out.seek(0)
        if status != "timeout" and proc.returncode == 0 and out.read(len(secret) + 1) == secret:
            status = "passed"
        err.seek(max(0, err.seek(0, os.SEEK_END) - 2000))
        tail = err.read().decode(errors="replace")
    return SandboxResult(status == "passed", status, tail, where)


def _sandbox_init(info_r: int) -> int | None:
    """A pidfd on the pid namespace's first process (from bwrap's --info-fd), or None if bwrap
    failed before making it."""
    data = b""
    while chunk := os.read(info_r, 4096):
        data += chunk
    try:
        return os.pidfd_open(json.loads(data)["child-pid"])
    except (ValueError, KeyError, ProcessLookupError):
        return None


def _end(proc: subprocess.Popen, pidfd: int | None) -> None:
    """Kill whatever of the run is left and wait until it is gone. Killing the pid namespace's
    first process kills every process in it; that process has exited (its pidfd reads ready)
    only once all the others have, while bwrap itself may exit a little earlier."""
    if pidfd is not None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        select.select([pidfd], [], [], 10.0)
        os.close(pidfd)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: children too
    proc.wait()
