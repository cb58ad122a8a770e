"""The sandbox: tests counted one by one, and the accidents of generated code (endless loops, exits, unbounded
allocation, writes outside its directory, network, processes, signals) stopped without harming this process."""

from __future__ import annotations

import resource
import socket
import tempfile
import time
from pathlib import Path

import pytest

from text_env.sandbox import Sandbox, TestReport, network_isolation

ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = ["assert candidate(1, 2) == 3", "assert candidate(0, 0) == 0", "assert candidate(-1, 1) == 0"]


def refused(statement: str) -> str:
    """A test that passes when ``statement`` raises PermissionError in the child (the sandbox refused it)."""
    return f"try:\n    {statement}\nexcept PermissionError:\n    pass\nelse:\n    raise AssertionError('allowed')"


@pytest.fixture
def sandbox_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The sandbox's temporary directories go here, so a test can see that they are removed."""
    root = tmp_path / "sandbox-tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def test_counts_each_test() -> None:
    sandbox = Sandbox()
    report = sandbox.run(ADD, ADD_TESTS, "add")
    assert (report.passed, report.total, report.status, report.fraction) == (3, 3, "ok", 1.0)
    assert isinstance(report, TestReport) and 0 < report.seconds < 5
    half = "def add(a, b):\n    return a + b if a > 0 else 7\n"
    tests = [*ADD_TESTS, "assert candidate(5, 5) == 10"]
    report = sandbox.run(half, tests, "add")
    assert (report.passed, report.total, report.status, report.fraction) == (2, 4, "ok", 0.5)
    assert sandbox.run("def add(a, b)\n    return 1", ADD_TESTS, "add").status == "error"  # does not compile
    assert sandbox.run("def plus(a, b):\n    return a + b", ADD_TESTS, "add").status == "error"  # no entry point
    assert sandbox.run("1 / 0\n" + ADD, ADD_TESTS, "add").passed == 0  # raises while defining
    no_binding = sandbox.run(ADD, ["assert add(2, 2) == 4", "assert 'candidate' not in dir()"], None)
    assert no_binding.passed == 2


def test_batch_keeps_order_and_is_bounded_in_time() -> None:
    sandbox = Sandbox(max_workers=2)
    bodies = ["return a + b", "return a - b", "return 0", "return a + b"] * 4
    programs = [f"def add(a, b):\n    {body}\n" for body in bodies]
    started = time.monotonic()
    reports = sandbox.run_batch(programs, [ADD_TESTS] * 16, ["add"] * 16)
    seconds = time.monotonic() - started
    assert [r.passed for r in reports] == [3, 1, 2, 3] * 4  # a - b passes (0, 0); 0 passes (0, 0) and (-1, 1)
    assert seconds < 30, seconds  # ~1 s on two shared cores (a process of ~0.1 s each)
    with pytest.raises(ValueError, match="one entry per program"):
        sandbox.run_batch(programs, [ADD_TESTS], ["add"])


def test_endless_loops_are_stopped() -> None:
    sandbox = Sandbox(timeout=4, test_timeout=0.5)
    spin = "def add(a, b):\n    while True:\n        pass\n"
    report = sandbox.run(spin, ADD_TESTS, "add")
    assert (report.passed, report.status) == (0, "ok")  # each test's alarm fires; the next test runs
    assert report.seconds < 3.5
    stubborn = "def add(a, b):\n    while True:\n        try:\n            x = 0\n"
    stubborn += "            while True:\n                x += 1\n        except BaseException:\n            pass\n"
    stubborn += "        except BaseException:\n            pass\n"
    started = time.monotonic()
    report = sandbox.run(stubborn, ["assert candidate(1, 1) == 2", *ADD_TESTS], "add")
    assert (report.passed, report.status) == (0, "timeout")  # swallows the alarm: the wall clock kills it
    assert time.monotonic() - started < 4 + 2


def test_exits_and_crashes_keep_earlier_results() -> None:
    sandbox = Sandbox()
    tests = ["assert candidate(1, 2) == 3", "import sys; sys.exit(3)", "assert candidate(2, 2) == 4"]
    assert sandbox.run(ADD, tests, "add").passed == 2  # sys.exit fails its own test only
    tests = ["assert candidate(1, 2) == 3", "import os; os._exit(0)", "assert candidate(2, 2) == 4"]
    report = sandbox.run(ADD, tests, "add")
    assert (report.passed, report.total, report.status) == (1, 3, "exited")  # what came before os._exit counts
    report = sandbox.run("import os\nos._exit(1)\n" + ADD, ADD_TESTS, "add")
    assert (report.passed, report.status) == (0, "exited")
    noisy = "import sys\nprint('junk' * 100000)\nsys.stderr.write('P' * 1000)\n" + ADD
    assert sandbox.run(noisy, ADD_TESTS, "add").passed == 3  # output never mixes with the results


def test_unbounded_allocation_fails_in_the_child_only() -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sandbox = Sandbox(memory_mb=256)
    hog = "def add(a, b):\n    blocks = []\n    while True:\n        blocks.append(bytearray(10 ** 7))\n"
    report = sandbox.run(hog, [*ADD_TESTS, "x = bytearray(10 ** 11)"], "add")
    assert (report.passed, report.status) == (0, "ok")  # MemoryError in each test, and the child carries on
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: this process did not grow


def test_files_outside_its_directory_are_safe(tmp_path: Path, sandbox_tmp: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    folder = tmp_path / "folder"
    folder.mkdir()
    tests = [
        refused(f"open({str(victim)!r}, 'w')"),
        refused(f"open({str(victim)!r}, 'a')"),
        refused(f"os.remove({str(victim)!r})"),
        refused(f"os.rename({str(victim)!r}, 'stolen.txt')"),
        refused(f"shutil.rmtree({str(folder)!r})"),
        refused(f"os.open({str(tmp_path / 'new.txt')!r}, os.O_CREAT | os.O_WRONLY)"),
        refused(f"open({str(victim)!r}).read()"),  # reading is refused outside the directory and the stdlib
        refused(f"os.listdir({str(tmp_path)!r})"),
        refused("os.symlink('/etc', 'etc'); open('etc/new', 'w')"),  # a link out of the directory does not help
        "open('inside.txt', 'w').write('x'); os.mkdir('sub'); os.chmod('sub', 0); assert open('inside.txt').read()",
        "assert os.getcwd() == os.path.expanduser('~') == os.environ['TMPDIR']",
        "import json, collections, hashlib; assert json.dumps([1]) == '[1]'",  # the standard library still imports
    ]
    report = Sandbox().run("import os, shutil\n" + ADD, tests, "add")
    assert (report.passed, report.status) == (len(tests), "ok")
    assert victim.read_text() == "keep me" and folder.is_dir() and not (tmp_path / "new.txt").exists()
    assert list(sandbox_tmp.iterdir()) == []  # its directory is gone, even with a subfolder it locked


def test_no_processes_or_signals() -> None:
    tests = [
        refused("import subprocess; subprocess.run(['true'])"),
        refused("os.system('true')"),
        refused("os.fork()"),
        refused("os.execv('/bin/true', ['true'])"),
        refused("os.posix_spawn('/bin/true', ['true'], {})"),
        refused("os.kill(os.getppid(), 9)"),  # this test process
        refused("import ctypes"),
        refused("import resource; resource.setrlimit(resource.RLIMIT_AS, (-1, -1))"),
    ]
    report = Sandbox().run("import os\n" + ADD, tests, "add")
    assert (report.passed, report.status) == (len(tests), "ok")


@pytest.mark.parametrize("namespace", [None, False], ids=["default", "audit-hook-only"])
def test_no_network(namespace: bool | None) -> None:
    """A connection to a server of this process fails in the child, with the network namespace (when the machine
    allows one) and with the audit hook alone; the server sees no connection."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.5)
        port = server.getsockname()[1]
        connect = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)"
        tests = [
            f"try:\n    {connect}\nexcept OSError:\n    pass\nelse:\n    raise AssertionError('connected')",
            refused("import socket; socket.getaddrinfo('localhost', 80)"),
            refused("import _socket; _socket.socket()"),
        ]
        sandbox = Sandbox(network_namespace=namespace)
        report = sandbox.run(ADD, tests, "add")
        assert (report.passed, report.status) == (3, "ok")
        with pytest.raises(TimeoutError):
            server.accept()
    if namespace is None:
        assert sandbox.network_namespace == bool(network_isolation())


def test_bad_settings_and_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        Sandbox(timeout=0)
    with pytest.raises(ValueError, match="max_workers"):
        Sandbox(max_workers=0)
    with pytest.raises(TypeError, match="a sequence of strings"):
        Sandbox().run(ADD, "assert True", "add")
    if not network_isolation():
        with pytest.raises(RuntimeError, match="unshare"):
            Sandbox(network_namespace=True)
