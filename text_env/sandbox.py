"""Run generated code and count the unit tests it passes, in a separate, limited process.

A policy's completion is code nobody has read, so it never runs in the trainer's process. Each program runs in a
fresh ``python -I -S -B`` child (started with ``subprocess``, not forked from the trainer: it shares no memory, model
or open files with it), in a new session so the whole process group can be killed, with:

- **a wall-clock limit** (``timeout``, the whole child; the process group is killed with SIGKILL) and a per-test
  alarm (``test_timeout``: one slow test fails, the next still runs); ``RLIMIT_CPU`` backs both;
- **a memory limit** (``RLIMIT_AS``: an unbounded allocation raises ``MemoryError`` in the child) and a file-size
  limit (``RLIMIT_FSIZE``);
- **its own temporary directory** as working directory, ``HOME`` and ``TMPDIR``, deleted afterwards; the standard
  library only (``-S``: no site-packages, ``-I``: no environment variables, user site or script directory);
- **an audit hook** (:pep:`578`) installed before the program runs that refuses: opening a file for writing, and
  removing, renaming, linking or changing any path, outside the temporary directory; reading or listing outside it and
  the standard library; creating sockets and resolving names; starting processes (``subprocess``, ``os.system``,
  ``os.fork``, ``os.exec*``, ``os.posix_spawn``); sending signals (``os.kill``); raising resource limits; importing
  ``ctypes`` or ``_posixsubprocess`` (which start processes and call C without an audit event); ``RLIMIT_NPROC`` 0 also
  stops forks for a user other than root;
- **no network namespace** when the machine allows one: the child runs under ``unshare --net`` (root) or
  ``unshare --net --map-root-user`` (unprivileged user namespaces) if either works, so it sees only a down loopback
  device; where neither works, "no network" means the audit hook's refusal of sockets and name lookups.

Each test is run on its own in ``try``/``except BaseException`` and reported through a private pipe the moment it
ends (not stdout, which the program may fill with junk; stdout and stderr go to ``/dev/null``), so a program that
calls ``sys.exit`` fails that test only, and one that calls ``os._exit``, crashes or is killed keeps the results
reported before.

**This is a guard against the accidents of a small language model, not a security boundary.** Audit hooks are
documented as unsuitable for sandboxing: code that means harm can get around them (through C extensions already
loaded, object introspection, or ``/proc``), reading files needs an ``open`` the hook sees but not every way of
reading, and root in the child is still root outside a user namespace. Run untrusted or adversarial code in a
container or VM with its own user, file system and network.

Example:
    >>> from text_env.sandbox import Sandbox
    >>> report = Sandbox().run("def add(a, b):\\n    return a + b", ["assert candidate(1, 2) == 3"], "add")
    >>> report.passed, report.total, report.status
    (1, 1, 'ok')
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache

__all__ = ["Sandbox", "TestReport", "network_isolation"]

# The child: set limits, install the audit hook, run the program, then each test, reporting one byte per step on
# the result pipe: L (program loaded) or E (it failed), P/F per test, D (done). Only the standard library.
_CHILD = r"""
import json, os, resource, signal, sys
cfg = json.loads(sys.stdin.read())
out = cfg["fd"]
home = os.path.realpath(cfg["home"])
def report(code):
    try:
        os.write(out, code)
    except OSError:
        pass
for limit, value in ((resource.RLIMIT_AS, cfg["memory"]), (resource.RLIMIT_CPU, cfg["cpu"]),
                     (resource.RLIMIT_FSIZE, cfg["fsize"]), (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, 0)):
    try:
        resource.setrlimit(limit, (value, value))
    except (ValueError, OSError):  # a hard limit already lower
        pass
readable = [home] + [os.path.realpath(p) for p in sys.path if p]
READ_FILES = {"/dev/null", "/dev/urandom", "/dev/random"}
REFUSED = {
    "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
    "os.startfile", "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill", "resource.setrlimit",
    "resource.prlimit", "socket.__new__", "socket.socketpair", "socket.connect", "socket.bind", "socket.sendto",
    "socket.sendmsg", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo",
    "socket.sethostname", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata",
    "ctypes.call_function", "webbrowser.open", "urllib.Request", "sys.remote_exec",
}
REFUSED_IMPORTS = {"ctypes", "_ctypes", "_posixsubprocess"}
WRITE_PATHS = {  # event -> positions of its path arguments
    "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.link": (0, 1),
    "os.symlink": (1,), "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,),
    "os.chflags": (0,), "os.lchflags": (0,), "os.mkfifo": (0,), "os.mknod": (0,), "os.setxattr": (0,),
    "os.removexattr": (0,), "shutil.rmtree": (0,), "shutil.copyfile": (1,), "shutil.copymode": (1,),
    "shutil.copystat": (1,), "shutil.move": (0, 1), "shutil.chown": (0,),
}
READ_PATHS = {"os.listdir": (0,), "os.scandir": (0,), "glob.glob": (0,), "os.listxattr": (0,)}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
def inside(path, roots):
    if path is None or isinstance(path, int):  # an open file descriptor, or the cwd
        return True
    real = os.path.realpath(os.fsdecode(path))
    return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots)
def hook(event, args):
    if event in REFUSED:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "import" and args[0].partition(".")[0] in REFUSED_IMPORTS:
        raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
    if event == "open":
        path, mode, flags = args
        writing = any(c in (mode or "") for c in "wax+") or bool((flags or 0) & WRITE_FLAGS)
        if writing and not inside(path, [home]):
            raise PermissionError(f"sandbox: writing {path!r} outside the sandbox directory is not allowed")
        if not writing and not inside(path, readable) and os.fsdecode(path) not in READ_FILES:
            raise PermissionError(f"sandbox: reading {path!r} outside the sandbox directory is not allowed")
    elif event in WRITE_PATHS:
        for i in WRITE_PATHS[event]:
            if not inside(args[i], [home]):
                raise PermissionError(f"sandbox: {event} on {args[i]!r} outside the sandbox directory is not allowed")
    elif event in READ_PATHS:
        if not inside(args[0], readable):
            raise PermissionError(f"sandbox: {event} of {args[0]!r} outside the sandbox directory is not allowed")
class TestTimeout(BaseException):  # not an Exception: a bare `except Exception` in the program does not swallow it
    pass
def alarm(signum, frame):
    raise TestTimeout(f"a step ran past {cfg['test_timeout']} s")
signal.signal(signal.SIGALRM, alarm)
def run(code, namespace):
    signal.setitimer(signal.ITIMER_REAL, cfg["test_timeout"])
    try:
        exec(code, namespace)
        return True
    except BaseException:
        return False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
sys.stdin = None
sys.addaudithook(hook)
namespace = {"__name__": "__sandbox__", "__builtins__": __builtins__}
try:
    program = compile(cfg["program"], "<program>", "exec")
except BaseException:
    program = None
loaded = program is not None and run(program, namespace)
entry = cfg["entry_point"]
if loaded and entry is not None:
    loaded = callable(namespace.get(entry))
    namespace["candidate"] = namespace.get(entry)
report(b"L" if loaded else b"E")
if loaded:
    for test in cfg["tests"]:
        try:
            code = compile(test, "<test>", "exec")
        except BaseException:
            report(b"F")
            continue
        report(b"P" if run(code, namespace) else b"F")
report(b"D")
os._exit(0)  # no interpreter shutdown: the program's atexit handlers and __del__ methods do not run
"""


@dataclass(frozen=True)
class TestReport:
    """What one program did against its tests.

    :param passed: tests that ran without raising.
    :param total: tests given.
    :param status: ``"ok"`` (every test ran), ``"error"`` (the program did not compile, raised while defining its
        functions, or lacks the entry point: no test ran), ``"timeout"`` (killed at the wall-clock limit) or
        ``"exited"`` (the child ended before the last test: ``os._exit``, a crash, a resource limit).
    :param seconds: wall-clock time of the child, start to end.
    """

    __test__ = False  # not a pytest test class despite its name

    passed: int
    total: int
    status: str
    seconds: float

    @property
    def fraction(self) -> float:
        """The fraction of tests passed, in ``[0, 1]`` (0 when there are no tests)."""
        return self.passed / self.total if self.total else 0.0


@cache
def network_isolation() -> tuple[str, ...]:
    """The command prefix that gives the child an empty network namespace on this machine (``unshare --net`` as
    root, ``unshare --net --map-root-user`` in an unprivileged user namespace), or ``()`` if neither works; tried
    once per process."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    for prefix in ((unshare, "--net"), (unshare, "--net", "--map-root-user")):
        try:
            done = subprocess.run([*prefix, sys.executable, "-I", "-S", "-c", "pass"], capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if done.returncode == 0:
            return prefix
    return ()


class Sandbox:
    """Runs programs against their unit tests in limited child processes, several at a time (see the module
    docstring for what is isolated and what is not).

    :param timeout: wall-clock seconds for one program's child, start-up, program and every test (default 5).
    :param test_timeout: seconds for the program's own definitions and for each test (default 1): a test in an
        endless loop fails and the next one runs.
    :param memory_mb: address-space limit of the child in MiB (default 1024).
    :param file_mb: largest file the child may write, in MiB (default 16).
    :param max_workers: children running at once in :meth:`run_batch` (default: the CPU count, at most 4).
    :param network_namespace: run the child under ``unshare --net`` (``None``: when the machine allows it).
    """

    def __init__(
        self,
        timeout: float = 5.0,
        test_timeout: float = 1.0,
        memory_mb: int = 1024,
        file_mb: int = 16,
        max_workers: int | None = None,
        network_namespace: bool | None = None,
    ) -> None:
        if not (timeout > 0 and test_timeout > 0 and memory_mb > 0 and file_mb > 0):
            raise ValueError(
                f"timeout, test_timeout, memory_mb and file_mb must be positive, got {timeout}, {test_timeout}, "
                f"{memory_mb}, {file_mb}"
            )
        if max_workers is not None and max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}")
        self.timeout, self.test_timeout = float(timeout), float(test_timeout)
        self.memory_mb, self.file_mb = int(memory_mb), int(file_mb)
        self.max_workers = max_workers or max(1, min(4, os.cpu_count() or 1))
        prefix = network_isolation() if network_namespace is not False else ()
        if network_namespace and not prefix:
            raise RuntimeError("network_namespace=True, but `unshare --net` does not work on this machine")
        self._prefix = prefix

    @property
    def network_namespace(self) -> bool:
        """Whether children run in their own, empty network namespace (else only the audit hook keeps them off)."""
        return bool(self._prefix)

    def run(self, program: str, tests: Sequence[str], entry_point: str | None = None) -> TestReport:
        """Run ``program``, then each test in its namespace, counting the tests that pass.

        :param program: Python source that defines the function (e.g. a prompt's signature and docstring plus the
            generated body).
        :param tests: Python snippets, each one test (e.g. ``"assert candidate(2) == 4"``), run in order in the
            program's namespace; a test passes when it runs without raising.
        :param entry_point: the function under test, bound to ``candidate`` for the tests (``None``: no binding);
            a program that does not define it passes no test.
        """
        if not isinstance(program, str) or isinstance(tests, str) or not all(isinstance(t, str) for t in tests):
            raise TypeError("program must be a string and tests a sequence of strings (one test each)")
        home = tempfile.mkdtemp(prefix="textgen-sandbox-")
        read_fd, write_fd = os.pipe()
        started = time.monotonic()
        timed_out = False
        try:
            config = {
                "program": program, "tests": list(tests), "entry_point": entry_point, "fd": write_fd, "home": home,
                "test_timeout": self.test_timeout, "memory": self.memory_mb << 20, "fsize": self.file_mb << 20,
                "cpu": math.ceil(self.timeout) + 1,
            }  # fmt: skip
            env = {"HOME": home, "TMPDIR": home, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
            child = subprocess.Popen(
                [*self._prefix, sys.executable, "-I", "-S", "-B", "-c", _CHILD],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=home, env=env,
                pass_fds=(write_fd,), start_new_session=True,
            )  # fmt: skip
            os.close(write_fd)
            write_fd = -1
            try:
                child.communicate(json.dumps(config).encode(), timeout=self.timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(child)
            codes = _read_all(read_fd)
        finally:
            os.close(read_fd)
            if write_fd >= 0:
                os.close(write_fd)
            _remove_tree(home)
        passed = codes.count(b"P")
        if codes.startswith(b"E"):
            status = "error"
        elif codes.endswith(b"D"):
            status = "ok"
        else:
            status = "timeout" if timed_out else "exited"
        return TestReport(passed, len(tests), status, time.monotonic() - started)

    def run_batch(
        self, programs: Sequence[str], tests: Sequence[Sequence[str]], entry_points: Sequence[str | None]
    ) -> list[TestReport]:
        """:meth:`run` for each ``(program, tests, entry point)``, up to ``max_workers`` children at once, in order."""
        if not len(programs) == len(tests) == len(entry_points):
            raise ValueError(
                f"programs, tests and entry_points must have one entry per program, got {len(programs)}, "
                f"{len(tests)} and {len(entry_points)}"
            )
        if len(programs) <= 1:
            return [self.run(p, t, e) for p, t, e in zip(programs, tests, entry_points, strict=True)]
        with ThreadPoolExecutor(min(self.max_workers, len(programs))) as pool:
            return list(pool.map(self.run, programs, tests, entry_points))


def _kill_group(child: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child's process group (it leads its own session), then reap the child."""
    with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
        os.killpg(child.pid, signal.SIGKILL)
    child.wait()


def _read_all(fd: int) -> bytes:
    """Whatever the child reported on the pipe, without blocking (a stray holder of the write end cannot hang us)."""
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _remove_tree(path: str) -> None:
    """Delete the child's directory, even parts it made unreadable or unwritable."""
    for root, dirs, _ in os.walk(path):
        for name in dirs:
            child = os.path.join(root, name)
            if not os.path.islink(child):
                with contextlib.suppress(OSError):
                    os.chmod(child, 0o700)
    shutil.rmtree(path, ignore_errors=True)
