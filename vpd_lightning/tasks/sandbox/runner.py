"""Run an untrusted Python program in a constrained subprocess.

Model output is untrusted code. Where the OS allows unprivileged user namespaces (probed once, see
:func:`launch_plan`), each run gets namespaces of its own (``boot.py`` builds them):

- **its own file system**: the root is a private, size-limited tmpfs (``scratch_mb``) that holds its
  working directory and ``/tmp`` and vanishes with the run; the host shows through only as read-only
  binds of the system libraries and the Python interpreter's standard library (no site-packages, no
  home directory, no project, no host ``/tmp``, ``/run`` or socket files);
- **its own PID namespace** whose init dies with the run, so no process outlives it;
- **its own network namespace** (no interface up: no TCP, UDP or abstract Unix sockets), IPC and UTS;
- **no privileges**: when the trainer is root the program runs as ``nobody``, else as the user inside a
  nested user namespace without capabilities over its mounts; ``no_new_privs``; nosuid binds.

Every run also gets a scrubbed environment, rlimits (CPU, address space, file size, open files,
processes), a seccomp filter (no new session, so one CPU group per run; no shared memory outside
the address space: ``REFUSED_SYSCALLS``), stdout+stderr merged and capped, and a wall-clock timeout
that kills every process.

Without namespaces the run is **weak**: a private temp dir (mode 0700) on the host file system, the
same limits, ``nobody`` when the trainer is root and ``nobody`` can run the interpreter; the program
can read what its user can read, write where its user can write, and use the network. This is said
once at start (a warning) and in every result (``SandboxResult.isolation``), never silently.
See ``docs/sandbox.md`` for the threat model.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import marshal
import os
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vpd_lightning.tasks.base import check_int, check_number

NOBODY = 65534
BOOT_SOURCE = Path(__file__).with_name("boot.py").read_text(encoding="utf-8")
SETUP_FAILED = 125  # exit status of the boot code when the sandbox could not be built
WORKDIR = "/sandbox"  # the program's working directory and HOME inside the namespaces
ISOLATED = "namespaces"
log = logging.getLogger(__name__)
# Refused (EPERM) to every process of every run, by a seccomp filter that ``boot.py`` installs:
# a new session or process group would leave the run's CPU group (the kernel's autogroup is per
# session; 16 setsid'd spinners took 16 shares) and the weak mode's kill; SysV shared memory,
# message queues and semaphores, POSIX message queues and memfds hold memory that no process's
# address space limit counts (3 GB of shm at memory_mb=128).
REFUSED_SYSCALLS = (
    "setsid",
    "setpgid",
    "shmget",
    "msgget",
    "semget",
    "mq_open",
    "memfd_create",
    "memfd_secret",
)
_GENERIC = {  # the kernel's generic syscall table (aarch64, riscv64)
    "setsid": 157,
    "setpgid": 154,
    "shmget": 194,
    "msgget": 186,
    "semget": 190,
    "mq_open": 180,
    "memfd_create": 279,
    "memfd_secret": 447,
}
_SYSCALL_TABLES = {  # machine: (AUDIT_ARCH_*, syscall numbers)
    "x86_64": (
        0xC000003E,
        {
            "setsid": 112,
            "setpgid": 109,
            "shmget": 29,
            "msgget": 68,
            "semget": 64,
            "mq_open": 240,
            "memfd_create": 319,
            "memfd_secret": 447,
        },
    ),
    "aarch64": (0xC00000B7, _GENERIC),
    "riscv64": (0xC00000F3, _GENERIC),
}


def _syscall_filter() -> tuple[int, tuple[int, ...]] | None:
    """What ``boot.py`` refuses on this machine: (audit arch, numbers of REFUSED_SYSCALLS), or
    None where no table is known (then ``LaunchPlan.isolation`` says so)."""
    table = _SYSCALL_TABLES.get(os.uname().machine)
    if table is None:
        return None
    arch, numbers = table
    return arch, tuple(numbers[name] for name in REFUSED_SYSCALLS)


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
    scratch_mb: int = 64

    def __post_init__(self) -> None:
        for name in (
            "timeout_s",
            "cpu_s",
            "memory_mb",
            "file_size_mb",
            "open_files",
            "processes",
            "scratch_mb",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(
                    f"SandboxLimits.{name} must be positive, got {getattr(self, name)}"
                )
        if self.output_bytes < 0:
            raise ValueError(f"SandboxLimits.output_bytes must be >= 0, got {self.output_bytes}")

    @classmethod
    def for_tests(cls, timeout_s: float, memory_mb: int, isolate_network: bool) -> SandboxLimits:
        """Limits for running a response against unit tests: CPU time just above the timeout,
        so a busy loop is stopped by the clock rather than counted against the CPU limit first.
        The values are the code task's own options (``data.task.init_args.*``), checked here."""
        check_number("timeout_s", timeout_s, 0.1, "must be a number of seconds >= 0.1")
        check_int("memory_mb", memory_mb, 16)
        return cls(
            timeout_s=timeout_s,
            cpu_s=max(1, int(timeout_s) + 1),
            memory_mb=memory_mb,
            isolate_network=isolate_network,
        )


@dataclass
class SandboxResult:
    """What came back from one run. ``report`` is what the program wrote to its report pipe.

    ``isolation`` is ``"namespaces"`` when the run had its own namespaces (and network isolation
    unless ``isolate_network`` was off), else ``"weak: <why>"``.
    """

    returncode: int | None
    output: str
    report: bytes
    timed_out: bool
    duration_s: float
    cpu_s: float
    network_isolated: bool
    isolation: str = ISOLATED
    setup_failed: bool = False


@dataclass(frozen=True)
class LaunchPlan:
    """How runs start on this machine, found once by probing (see :func:`launch_plan`).

    ``isolated``: namespaces work here. ``uid``: the host uid that runs the program. ``reason``:
    why the namespaces are not used ("" when they are). ``weak_drop``: in the weak mode, whether
    root drops to ``nobody``.
    """

    isolated: bool
    uid: int
    reason: str = ""
    weak_drop: bool = False

    @property
    def network_isolated(self) -> bool:
        return self.isolated

    @property
    def isolation(self) -> str:
        mode = ISOLATED if self.isolated else f"weak: {self.reason}"
        if _syscall_filter() is None:
            mode += f"; no syscall filter on {os.uname().machine} (setsid, shared memory allowed)"
        return mode


@dataclass(frozen=True)
class _FileSystem:
    """What of the host the program sees (read-only), computed once in the trainer."""

    links: tuple[tuple[str, str], ...]
    read_only: tuple[str, ...]
    hidden: tuple[str, ...]
    staging: str


def _under(path: str, roots: Sequence[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def _file_system() -> _FileSystem:
    links: list[tuple[str, str]] = []
    read_only: list[str] = []
    for name in ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = f"/{name}"
        if os.path.islink(path):
            links.append((path, os.readlink(path)))
        elif os.path.isdir(path):
            read_only.append(path)
    interpreter = [sys.base_prefix, sys.base_exec_prefix, os.path.dirname(_executable())]
    for path in map(os.path.realpath, interpreter):
        if os.path.isdir(path) and not _under(path, read_only):
            read_only.append(path)
    for path in ("/etc/ld.so.cache", "/etc/localtime"):
        if os.path.islink(path):
            target = os.path.realpath(path)
            if _under(target, read_only):
                links.append((path, target))
        elif os.path.isfile(path):
            read_only.append(path)
    # Installed packages are not the program's business (they include datasets and their tests).
    base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}
    candidates = {sysconfig.get_paths(vars=base)[key] for key in ("purelib", "platlib")}
    candidates.update(glob.glob("/usr/lib/python3*/dist-packages"))
    candidates.update(glob.glob("/usr/local/lib/python3*/*-packages"))
    candidates.update(glob.glob("/usr/lib/python3*/site-packages"))
    hidden = sorted(
        os.path.realpath(p)
        for p in candidates
        if os.path.isdir(p) and _under(os.path.realpath(p), read_only)
    )
    # Where the new root is assembled: a directory of the host that contains nothing exposed.
    staging = next(
        p
        for p in ("/tmp", "/mnt", "/media", "/srv", "/opt", "/home")
        if os.path.isdir(p) and not any(_under(r, [p]) for r in read_only)
    )
    return _FileSystem(tuple(links), tuple(read_only), tuple(hidden), staging)


def _executable() -> str:
    """The real interpreter binary (a venv's ``bin/python`` is a link to the base one)."""
    return os.path.realpath(sys.executable)


def _boot_argv(bundle_fd: int) -> list[str]:
    return [sys.executable, "-I", "-S", "-B", "-c", BOOT_SOURCE, str(bundle_fd)]


_plan_lock = threading.Lock()
_plan: LaunchPlan | None = None


def launch_plan() -> LaunchPlan:
    """Probe once per process: do user, mount, PID and network namespaces work here (a trivial
    program is run the full way), and if not, can root drop to ``nobody`` in the weak mode? Warns
    once when the weak mode is used."""
    global _plan
    with _plan_lock:
        if _plan is None:
            _plan = _probe()
            if not _plan.isolated:
                message = (
                    f"vpd_lightning sandbox: {_plan.reason}; model-written code runs in the WEAK "
                    "mode (no private file system, no network or PID isolation). See "
                    "docs/sandbox.md."
                )
                warnings.warn(message, RuntimeWarning, stacklevel=2)
                log.warning(message)
        return _plan


def _probe() -> LaunchPlan:
    uid = os.geteuid()
    isolated = LaunchPlan(isolated=True, uid=NOBODY if uid == 0 else uid)
    try:
        hidden = str(Path(__file__).resolve().parent)
        check = f"import os\nassert os.getpid() == 2 and not os.path.exists({hidden!r})"
        result = _run(check, plan=isolated, limits=SandboxLimits(timeout_s=30, cpu_s=30))
        if result.returncode == 0:
            return isolated
        why = result.output.strip().splitlines()[-1] if result.output.strip() else ""
        reason = f"namespaces unavailable ({why or f'exit status {result.returncode}'})"
    except OSError as exc:
        reason = f"namespaces unavailable ({exc})"
    if uid != 0:
        return LaunchPlan(isolated=False, uid=uid, reason=reason)
    dropped = LaunchPlan(isolated=False, uid=NOBODY, reason=reason, weak_drop=True)
    try:
        if _run("pass", plan=dropped, limits=SandboxLimits()).returncode == 0:
            return dropped
    except OSError:
        pass
    return LaunchPlan(isolated=False, uid=0, reason=f"{reason}; runs as root")


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


class SandboxClosed(Exception):
    """The program closed its end of a pipe (it exited or was killed)."""


class SandboxProcess:
    """One sandboxed run of ``script`` that the caller may talk to while it runs.

    The program's argv ends with two file descriptor numbers: one to read what the caller
    :meth:`send`\\ s, one to write what the caller :meth:`receive`\\ s. ``files`` are written into
    its working directory first. :meth:`finish` ends the run (waiting up to the deadline, or not at
    all) and kills every process it left.
    """

    def __init__(
        self,
        script: str,
        *,
        files: Mapping[str, str | bytes] | None = None,
        args: Sequence[str] = (),
        limits: SandboxLimits | None = None,
        plan: LaunchPlan | None = None,
    ) -> None:
        self.limits = limits = limits or SandboxLimits()
        self.plan = plan = plan or launch_plan()
        self.start = time.monotonic()
        self.deadline = self.start + limits.timeout_s
        self._fds: list[int] = []
        self._workdir: Path | None = None
        self._result: SandboxResult | None = None
        try:
            self._launch(script, dict(files or {}), list(args))
        except BaseException:
            self._close_fds()
            if self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)
            raise

    def _launch(self, script: str, files: dict[str, str | bytes], args: list[str]) -> None:
        limits, plan = self.limits, self.plan
        to_program_r, self._to_program = os.pipe()
        self._from_program, from_program_w = os.pipe()
        bundle = os.memfd_create("vpd-sandbox-bundle")
        self._fds += [to_program_r, self._to_program, self._from_program, from_program_w, bundle]
        mb = 1024 * 1024
        processes = limits.processes
        if not plan.isolated:  # Linux counts processes per user; namespaced runs count their own
            processes += _tasks_of_user(plan.uid)
        rlimits = [
            ("RLIMIT_CPU", limits.cpu_s),
            ("RLIMIT_AS", limits.memory_mb * mb),
            ("RLIMIT_FSIZE", limits.file_size_mb * mb),
            ("RLIMIT_NOFILE", limits.open_files),
            ("RLIMIT_NPROC", processes),
            ("RLIMIT_CORE", 0),
        ]
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0",
            "PYTHONIOENCODING": "utf-8",
        }
        boot: dict[str, object] = {
            "isolate": plan.isolated,
            "rlimits": rlimits,
            "executable": _executable(),
            "program_fds": [to_program_r, from_program_w],
            "refused_syscalls": _syscall_filter(),
        }
        if plan.isolated:
            fs = _file_system()
            root = os.geteuid() == 0
            env.update(HOME=WORKDIR, TMPDIR="/tmp")
            boot.update(
                network=limits.isolate_network,
                # Root: inside uid 0 (set-up only) is host root, inside 1 (the program) is nobody.
                uid_map="0 0 1\n1 65534 1" if root else f"0 {os.geteuid()} 1",
                gid_map="0 0 1\n1 65534 1" if root else f"0 {os.getegid()} 1",
                setgroups="" if root else "deny",
                drop="setuid" if root else "userns",
                run_uid=1 if root else 0,
                run_gid=1 if root else 0,
                fs={
                    "staging": fs.staging,
                    "scratch_mb": limits.scratch_mb,
                    "inodes": 4096 + 64 * limits.scratch_mb,
                    "links": fs.links,
                    "read_only": fs.read_only,
                    "hidden": fs.hidden,
                    "workdir": WORKDIR,
                },
            )
        else:
            self._workdir = Path(tempfile.mkdtemp(prefix="vpd-sandbox-"))
            if plan.weak_drop:
                os.chown(self._workdir, NOBODY, NOBODY)
            env.update(HOME=str(self._workdir), TMPDIR=str(self._workdir))
            boot.update(
                workdir=str(self._workdir),
                drop="setuid" if plan.weak_drop else "none",
                run_uid=NOBODY,
                run_gid=NOBODY,
            )
        boot["env"] = env
        contents = {"plan": boot, "script": script, "files": files, "args": args}
        os.write(bundle, marshal.dumps(contents))
        self._proc = subprocess.Popen(
            _boot_argv(bundle),
            cwd="/",
            env={"LANG": "C.UTF-8"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            pass_fds=(bundle, to_program_r, from_program_w),
            start_new_session=True,
        )
        for fd in (bundle, to_program_r, from_program_w):
            os.close(fd)
            self._fds.remove(fd)
        self._output = bytearray()
        self._reader = threading.Thread(
            target=_drain, args=(self._proc.stdout, limits.output_bytes, self._output), daemon=True
        )
        self._reader.start()

    # -- talking to the program ------------------------------------------------------------

    def remaining(self) -> float:
        return max(self.deadline - time.monotonic(), 0.0)

    def send(self, data: bytes) -> None:
        """Write ``data`` to the program before the deadline (TimeoutError) or SandboxClosed."""
        view = memoryview(data)
        os.set_blocking(self._to_program, False)
        while view:
            try:
                written = os.write(self._to_program, view)
            except BlockingIOError:
                written = 0
            except BrokenPipeError as exc:
                raise SandboxClosed("the program stopped reading") from exc
            view = view[written:]
            if view and not select.select([], [self._to_program], [], self.remaining())[1]:
                raise TimeoutError("the program did not read in time")

    def close_input(self) -> None:
        if self._to_program in self._fds:
            os.close(self._to_program)
            self._fds.remove(self._to_program)

    def receive(self, size: int) -> bytes:
        """Exactly ``size`` bytes from the program before the deadline; TimeoutError or
        SandboxClosed (with what was read so far lost) otherwise."""
        data = bytearray()
        while len(data) < size:
            if not select.select([self._from_program], [], [], self.remaining())[0]:
                raise TimeoutError("no answer from the program in time")
            chunk = os.read(self._from_program, min(size - len(data), 1 << 20))
            if not chunk:
                raise SandboxClosed("the program closed its report pipe")
            data.extend(chunk)
        return bytes(data)

    # -- ending the run --------------------------------------------------------------------

    def finish(self, *, wait: bool = True) -> SandboxResult:
        """End the run: wait for the program until the deadline (``wait``) or not, then kill every
        process it left and reap them. Idempotent."""
        if self._result is not None:
            return self._result
        try:
            self.close_input()
            timed_out, status, cpu_s = _wait(self._proc, self.remaining() if wait else 0.0)
            timed_out = timed_out and wait
            self._reader.join(timeout=1.0)
            if not self._reader.is_alive():
                self._proc.stdout.close()
            report = _read_available(self._from_program, limit=1 << 16)
        finally:
            self._close_fds()
            if self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)
        output = bytes(self._output).decode("utf-8", errors="replace")
        setup_failed = status == SETUP_FAILED and output.startswith("sandbox setup failed")
        if setup_failed:
            log.warning("vpd_lightning sandbox: %s", output.strip()[:500])
        if self.plan.isolated and 128 < status < 160:  # the boot code's "died from signal N"
            status = 128 - status
        self._result = SandboxResult(
            returncode=status,
            output=output,
            report=report,
            timed_out=timed_out,
            duration_s=time.monotonic() - self.start,
            cpu_s=cpu_s,
            network_isolated=self.plan.isolated and self.limits.isolate_network,
            isolation=self.plan.isolation
            + ("" if self.limits.isolate_network else "; network allowed (isolate_network=False)"),
            setup_failed=setup_failed,
        )
        return self._result

    def _close_fds(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

    def __enter__(self) -> SandboxProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.finish(wait=False)


def _run(script: str, *, plan: LaunchPlan, limits: SandboxLimits) -> SandboxResult:
    process = SandboxProcess(script, limits=limits, plan=plan)
    return process.finish()


def run_python(
    script: str,
    *,
    files: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    secret: bytes = b"",
    limits: SandboxLimits | None = None,
) -> SandboxResult:
    """Run ``script`` (source text) in a fresh sandbox and wait for it (up to the timeout).

    ``files`` are written into its working directory first. The program gets two extra file
    descriptors whose numbers end its argv: one to read ``secret`` from (at most a few KB), one to
    write a report to.
    """
    process = SandboxProcess(script, files=files, args=args, limits=limits)
    try:
        if secret:
            process.send(secret)
    except (SandboxClosed, TimeoutError):
        pass
    return process.finish()


def _wait(proc: subprocess.Popen, timeout_s: float) -> tuple[bool, int, float]:
    """Wait up to ``timeout_s``, kill the process group, reap: (timed out, exit status, CPU seconds).

    The group is killed before reaping (the zombie keeps its pid, so the group id cannot have been
    reused). In the namespaced mode that kills the run's PID 1, which ends every process of the run
    wherever it went; in the weak mode it ends the children that stayed in the group. CPU time
    comes from ``wait4`` and includes the descendants that were waited for.
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
