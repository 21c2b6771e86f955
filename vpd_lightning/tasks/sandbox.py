"""Run an untrusted Python program in a constrained subprocess.

Model output is untrusted code. Each run gets:

- a fresh temporary directory as its working directory, removed afterwards;
- a scrubbed environment (``PATH``, ``HOME`` = the temp dir, ``LANG``, ``PYTHONHASHSEED=0``) and
  ``python -I`` (no ``PYTHON*`` variables, no user site-packages, no cwd on ``sys.path``);
- stdin closed; stdout and stderr merged and captured up to ``output_bytes`` (the rest is drained and
  dropped, so a chatty program cannot fill memory);
- rlimits: CPU seconds, address space (memory), file size, open files and processes (counted on top of
  the processes its user already runs, since Linux counts them per user);
- a wall-clock timeout after which the whole process group is killed (``start_new_session`` +
  ``killpg``);
- when the OS allows it without privileges (``unshare --user --net --pid``): no network (an empty
  network namespace) and its own PID namespace, so every process it forks dies with it even if it
  left the process group;
- when the caller is root and ``nobody`` can execute the interpreter: the program runs as ``nobody``
  (uid/gid 65534), since root ignores the process limit and may write anywhere.

What it does NOT stop (it is not a container): reading any file the user can read (source, data,
keys in ``$HOME`` when not root), writing files outside the temp dir that the user may write, using
the network where ``unshare`` is unavailable, using up disk bandwidth or memory bandwidth, and
consuming machine time within the limits. Run untrusted models' code inside a real container or VM
when that matters. See ``docs/sandbox.md``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

NOBODY = 65534


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run. All have defaults that suit unit-test style checks."""

    timeout_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 4096
    file_size_mb: int = 16
    open_files: int = 64
    processes: int = 16
    output_bytes: int = 64_000
    isolate_network: bool = True

    def __post_init__(self) -> None:
        for name in ("timeout_s", "cpu_s", "memory_mb", "file_size_mb", "open_files", "processes"):
            if getattr(self, name) <= 0:
                raise ValueError(
                    f"SandboxLimits.{name} must be positive, got {getattr(self, name)}"
                )
        if self.output_bytes < 0:
            raise ValueError(f"SandboxLimits.output_bytes must be >= 0, got {self.output_bytes}")

    @classmethod
    def for_tests(cls, timeout_s: float, memory_mb: int, isolate_network: bool) -> SandboxLimits:
        """Limits for running a response against unit tests: CPU time just above the timeout,
        so a busy loop is stopped by the clock rather than counted against the CPU limit first."""
        return cls(
            timeout_s=timeout_s,
            cpu_s=max(1, int(timeout_s) + 1),
            memory_mb=memory_mb,
            isolate_network=isolate_network,
        )


@dataclass
class SandboxResult:
    """What came back from one run. ``report`` is what the program wrote to its report pipe."""

    returncode: int | None
    output: str
    report: bytes
    timed_out: bool
    duration_s: float
    cpu_s: float
    network_isolated: bool


# Runs first inside the sandbox: sets the rlimits, then the program. Doing it here rather than in a
# ``preexec_fn`` keeps process creation safe in a multi-threaded trainer.
_BOOT = """\
import resource, runpy, sys
_names = ("RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_NPROC", "RLIMIT_CORE")
for _name, _value in zip(_names, sys.argv[1:7]):
    _soft = int(_value)
    _hard = _soft + 1 if _name == "RLIMIT_CPU" else _soft  # SIGXCPU at soft, SIGKILL at hard
    resource.setrlimit(getattr(resource, _name), (_soft, _hard))
sys.argv = sys.argv[7:]
del resource, _names, _name, _value, _soft, _hard
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@dataclass(frozen=True)
class LaunchPlan:
    """How runs start on this machine, found once by probing (see :func:`launch_plan`)."""

    prefix: tuple[str, ...]
    popen_identity: tuple[tuple[str, object], ...]
    uid: int

    @property
    def network_isolated(self) -> bool:
        return bool(self.prefix)


def _can_run(prefix: tuple[str, ...], identity: dict[str, object]) -> bool:
    try:
        probe = subprocess.run(
            [*prefix, sys.executable, "-I", "-c", "pass"],
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=30,
            check=False,
            **identity,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


@functools.cache
def launch_plan() -> LaunchPlan:
    """Probe once: can root drop to ``nobody`` (the interpreter must be reachable by it), and do
    unprivileged user + network + PID namespaces work here?"""
    identity: dict[str, object] = {}
    uid = os.geteuid()
    if uid == 0:
        drop = {"user": NOBODY, "group": NOBODY, "extra_groups": []}
        if _can_run((), drop):
            identity, uid = drop, NOBODY
    prefix: tuple[str, ...] = ()
    exe = shutil.which("unshare")
    if exe is not None:
        candidate = (exe, "--user", "--net", "--pid", "--fork", "--kill-child")
        if _can_run(candidate, identity):
            prefix = candidate
    return LaunchPlan(prefix=prefix, popen_identity=tuple(identity.items()), uid=uid)


def _tasks_of_user(uid: int) -> int:
    """Threads and processes owned by ``uid``: what RLIMIT_NPROC is checked against."""
    count = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid == uid:
                count += len(os.listdir(f"/proc/{entry.name}/task"))
        except OSError:
            continue
    return count


def _drain(stream, cap: int, sink: bytearray) -> None:
    """Keep the first ``cap`` bytes of ``stream`` and read the rest to nowhere."""
    while chunk := stream.read(65536):
        if len(sink) < cap:
            sink.extend(chunk[: cap - len(sink)])


def _read_available(fd: int, limit: int) -> bytes:
    """Read what is in the pipe without blocking on a writer that outlived the program."""
    os.set_blocking(fd, False)
    data = bytearray()
    while len(data) < limit:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        data.extend(chunk)
    return bytes(data[:limit])


def run_python(
    script: str,
    *,
    files: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    secret: bytes = b"",
    limits: SandboxLimits | None = None,
) -> SandboxResult:
    """Run ``script`` (source text) with ``python -I`` in a fresh sandbox.

    ``files`` are written into the temp dir first. The program gets two extra file descriptors whose
    numbers end its argv: one to read ``secret`` from (at most a few KB), one to write a report to.
    """
    limits = limits or SandboxLimits()
    plan = launch_plan()
    prefix = plan.prefix if limits.isolate_network else ()
    mb = 1024 * 1024
    rlimits = (
        limits.cpu_s,
        limits.memory_mb * mb,
        limits.file_size_mb * mb,
        limits.open_files,
        _tasks_of_user(plan.uid) + limits.processes,
        0,
    )
    workdir = Path(tempfile.mkdtemp(prefix="vpd-sandbox-"))
    open_fds: list[int] = []
    start = time.monotonic()
    try:
        secret_r, secret_w = os.pipe()
        report_r, report_w = os.pipe()
        open_fds += [secret_r, secret_w, report_r, report_w]
        for name, text in {"main.py": script, **(files or {})}.items():
            (workdir / name).write_text(text)
        if plan.uid != os.geteuid():
            for path in (workdir, *workdir.iterdir()):
                os.chown(path, plan.uid, plan.uid)
        os.write(secret_w, secret)
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(workdir),
            "TMPDIR": str(workdir),
            "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0",
            "PYTHONIOENCODING": "utf-8",
        }
        argv = [
            *prefix,
            sys.executable,
            "-I",
            "-B",
            "-c",
            _BOOT,
            *map(str, rlimits),
            "main.py",
            *args,
            str(secret_r),
            str(report_w),
        ]
        proc = subprocess.Popen(
            argv,
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            pass_fds=(secret_r, report_w),
            start_new_session=True,
            **dict(plan.popen_identity),
        )
        for fd in (secret_w, secret_r, report_w):
            os.close(fd)
            open_fds.remove(fd)
        output = bytearray()
        reader = threading.Thread(
            target=_drain, args=(proc.stdout, limits.output_bytes, output), daemon=True
        )
        reader.start()
        timed_out, status, cpu_s = _wait(proc, limits.timeout_s)
        reader.join(timeout=1.0)
        if not reader.is_alive():
            proc.stdout.close()
        return SandboxResult(
            returncode=status,
            output=bytes(output).decode("utf-8", errors="replace"),
            report=_read_available(report_r, limit=1 << 16),
            timed_out=timed_out,
            duration_s=time.monotonic() - start,
            cpu_s=cpu_s,
            network_isolated=bool(prefix),
        )
    finally:
        for fd in open_fds:
            os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)


def _wait(proc: subprocess.Popen, timeout_s: float) -> tuple[bool, int, float]:
    """Wait up to ``timeout_s``, kill the process group, reap: (timed out, exit status, CPU seconds).

    The group is killed before reaping (the zombie keeps its pid, so the group id cannot have been
    reused), which also ends children a finished program left behind. CPU time comes from ``wait4``
    and includes the descendants it waited for: under ``unshare --fork`` that is the only way to tell
    that the CPU limit ended the program, since ``unshare`` itself just exits 1.
    """
    pidfd = os.pidfd_open(proc.pid)
    try:
        timed_out = not select.select([pidfd], [], [], timeout_s)[0]
    finally:
        os.close(pidfd)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return timed_out, proc.returncode, usage.ru_utime + usage.ru_stime
