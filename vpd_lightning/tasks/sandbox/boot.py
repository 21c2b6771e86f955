"""Start-up code of one sandboxed run (read as text by ``runner.py`` and run with ``python -I -S -c``;
never imported). Only the standard library; everything before ``exec`` in ``_run_program`` is
trusted, and it imports as little as it can (no ``json``, ``re``, ``enum``): start-up time is most of
a run's cost.

``sys.argv[1]`` is a file descriptor (a memfd) holding the run's bundle, ``marshal`` data written by
the trainer: the plan (how to build the sandbox), the program's source, its files and arguments.
With ``plan["isolate"]`` the processes are:

- **P** (this process, in the trainer's namespaces): forks C1, writes C1's uid/gid maps, waits.
- **C1**: ``unshare`` of user, mount, PID, IPC, UTS (and network) namespaces; forks C; waits.
- **C**: PID 1 of the new PID namespace. Builds the file system: a size-limited tmpfs as the new root,
  read-only binds of the interpreter and system libraries, its own ``/proc``, a few device nodes, and
  nothing else of the host (no home, no project, no ``/tmp``, no sockets); ``pivot_root`` into it and
  drops the old root. Forks G, waits for it, then exits, which kills every process left in the
  namespace. C and C1 die with their parent (``PR_SET_PDEATHSIG``), so killing P ends everything.
- **G**: drops every privilege (to an unmapped-to-root uid, or into a nested user namespace), refuses
  the system calls that would leave the run's limits (a seccomp filter: new sessions, shared memory
  outside the address space), sets the rlimits, and runs the program from the bundle. This is the
  only process that runs untrusted code.

Without ``isolate`` (the OS does not allow the namespaces) P itself becomes G in a private temp dir the
trainer made, optionally as ``nobody``: the weak mode that ``runner.py`` names in every result.

Exit status of P: the program's exit code, or 128 + N if it died from signal N; 125 with a message
on stderr if the sandbox could not be set up.
"""

import _signal as signal
import ctypes
import marshal
import os
import select
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_EPERM = 0x00050000 | 1  # SECCOMP_RET_ERRNO | EPERM
X32_SYSCALL_BIT = 0x40000000
BPF_LOAD, BPF_JEQ, BPF_JGE, BPF_RET = 0x20, 0x15, 0x35, 0x06  # ld [k]; jeq, jge #k; ret #k
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
SYS_MOUNT_SETATTR = 442  # the same number on every architecture
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
SETUP_FAILED = 125

BUNDLE_FD = int(sys.argv[1])
BUNDLE = marshal.loads(os.pread(BUNDLE_FD, os.fstat(BUNDLE_FD).st_size, 0))
PLAN = BUNDLE.pop("plan")
LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.syscall.restype = ctypes.c_long


class SetupError(Exception):
    pass


def _check(result, what):
    if result != 0:
        errno = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(errno)} (errno {errno})")


def _mount(source, target, fstype, flags, data=None):
    _check(
        LIBC.mount(
            None if source is None else os.fsencode(source),
            os.fsencode(target),
            None if fstype is None else fstype.encode(),
            ctypes.c_ulong(flags),
            None if data is None else data.encode(),
        ),
        f"mount {source} on {target}",
    )


def _prctl(option, value):
    _check(LIBC.prctl(option, ctypes.c_ulong(value), 0, 0, 0), f"prctl {option}")


def _die_with_parent(lifeline=None):
    """SIGKILL when the parent dies; exit now if it already has (no race: checked after setting)."""
    parent = os.getppid()
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if lifeline is not None:
        if select.select([lifeline], [], [], 0)[0]:  # EOF: the parent is gone
            os._exit(SETUP_FAILED)
    elif os.getppid() != parent:
        os._exit(SETUP_FAILED)


def _exit_code(status):
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _wait_for(pid):
    """Reap children until ``pid`` exits (PID 1 also reaps orphans); its exit code."""
    while True:
        reaped, status = os.wait()
        if reaped == pid:
            return _exit_code(status)


def _close_fds_except(keep):
    low = 0
    for fd in [*sorted(set(keep)), os.sysconf("SC_OPEN_MAX")]:
        if low < fd:  # closerange(a, b) with b <= a closes everything from a on
            os.closerange(low, fd)
        low = fd + 1


def _mount_setattr_readonly(path):
    """Make the bind at ``path`` and every mount below it read-only, nosuid, nodev."""

    class MountAttr(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint64) for n in ("set", "clr", "prop", "userns_fd")]

    attr = MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0, 0, 0)
    result = LIBC.syscall(
        ctypes.c_long(SYS_MOUNT_SETATTR),
        ctypes.c_int(AT_FDCWD),
        os.fsencode(path),
        ctypes.c_uint(AT_RECURSIVE),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    if result == 0:
        return
    if ctypes.get_errno() != 38:  # ENOSYS: kernel before 5.12, remount the top mount instead
        _check(result, f"mount_setattr {path}")
    flags = os.statvfs(path).f_flag
    keep = 0
    for bit, st in ((0x400, os.ST_NOATIME), (0x800, os.ST_NODIRATIME), (0x200000, os.ST_RELATIME)):
        if flags & st:
            keep |= bit
    if flags & os.ST_NOEXEC:
        keep |= MS_NOEXEC
    _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | keep)


def _inside(root, path):
    return os.path.join(root, path.lstrip("/"))


def _bind(root, source, readonly=True):
    target = _inside(root, source)
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "a"):
            pass
    _mount(source, target, None, MS_BIND | MS_REC)
    if readonly:
        _mount_setattr_readonly(target)


def _build_root(fs):
    """Assemble the new root on a tmpfs at a staging point and ``pivot_root`` into it."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    root = fs["staging"]
    size = f"size={fs['scratch_mb']}m,nr_inodes={fs['inodes']},mode=755"
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, size)
    for path, target in fs["links"]:
        os.makedirs(os.path.dirname(_inside(root, path)), exist_ok=True)
        os.symlink(target, _inside(root, path))
    for path in fs["read_only"]:
        _bind(root, path)
    for path in fs["hidden"]:
        _mount("tmpfs", _inside(root, path), "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k")
    dev = _inside(root, "/dev")
    os.makedirs(dev, exist_ok=True)
    for name in ("null", "zero", "full", "random", "urandom"):
        with open(os.path.join(dev, name), "w"):
            pass
        _mount(f"/dev/{name}", os.path.join(dev, name), None, MS_BIND)
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, os.path.join(dev, name))
    for path in ("/dev/shm", "/tmp"):
        os.makedirs(_inside(root, path), exist_ok=True)
        os.chmod(_inside(root, path), 0o1777)
    work = _inside(root, fs["workdir"])
    os.makedirs(work, exist_ok=True)
    os.chown(work, PLAN["run_uid"], PLAN["run_gid"])
    os.chmod(work, 0o700)
    proc = _inside(root, "/proc")
    os.makedirs(proc, exist_ok=True)
    try:  # its own /proc: only this run's processes (some containers refuse it; then none)
        _mount("proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except SetupError:
        pass
    else:
        # No further user or mount namespaces below this one (the program's own, when it drops
        # privileges that way, is the one allowed): no tmpfs of its own beyond the scratch limit.
        own = 1 if PLAN["drop"] == "userns" else 0
        for name, limit in (("max_user_namespaces", own), ("max_mnt_namespaces", 1)):
            with open(os.path.join(proc, "sys/user", name), "w") as handle:
                handle.write(str(limit))
    os.chdir(root)
    machine = os.uname().machine
    if machine not in SYS_PIVOT_ROOT:
        raise SetupError(f"pivot_root: unknown architecture {machine}")
    _check(LIBC.syscall(ctypes.c_long(SYS_PIVOT_ROOT[machine]), b".", b"."), "pivot_root")
    _check(LIBC.umount2(b".", MNT_DETACH), "umount old root")
    os.chdir("/")
    # The root itself (scratch) stays writable; make it nosuid/nodev (already) and go on.


def _drop_privileges():
    """Leave every capability behind before untrusted code runs."""
    drop = PLAN["drop"]
    if drop == "setuid":
        os.setgroups([])
        os.setresgid(PLAN["run_gid"], PLAN["run_gid"], PLAN["run_gid"])
        os.setresuid(PLAN["run_uid"], PLAN["run_uid"], PLAN["run_uid"])
    elif drop == "userns":
        # A nested user namespace: capabilities only there, none over this mount namespace.
        _check(LIBC.unshare(CLONE_NEWUSER), "unshare nested user namespace")
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    _refuse_syscalls(PLAN["refused_syscalls"])


def _refuse_syscalls(refused):
    """A seccomp filter, inherited by every process of the run and never removable: the calls in
    ``refused`` ((audit arch, syscall numbers), from the trainer; None: none known for this
    machine) fail with EPERM, and so does every call of another ABI (i386 or x32 on x86_64)."""
    if refused is None:
        return
    arch, numbers = refused
    n = len(numbers)
    program = [
        (BPF_LOAD, 0, 0, 4),  # seccomp_data.arch
        (BPF_JEQ, 1, 0, arch),
        (BPF_RET, 0, 0, SECCOMP_RET_EPERM),
        (BPF_LOAD, 0, 0, 0),  # seccomp_data.nr
        (BPF_JGE, n + 1, 0, X32_SYSCALL_BIT),  # to the last instruction
        *((BPF_JEQ, n - i, 0, number) for i, number in enumerate(numbers)),
        (BPF_RET, 0, 0, SECCOMP_RET_ALLOW),
        (BPF_RET, 0, 0, SECCOMP_RET_EPERM),
    ]

    class SockFilter(ctypes.Structure):
        _fields_ = [
            ("code", ctypes.c_uint16),
            ("jt", ctypes.c_uint8),
            ("jf", ctypes.c_uint8),
            ("k", ctypes.c_uint32),
        ]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    filters = (SockFilter * len(program))(*(SockFilter(*op) for op in program))
    fprog = SockFprog(len(program), filters)
    result = LIBC.prctl(
        PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(fprog), 0, 0
    )
    _check(result, "seccomp filter")


def _run_program(keep):
    """G: limits, environment, files, then the program (the first untrusted code)."""
    os.close(BUNDLE_FD)
    _close_fds_except(keep)
    import resource

    for name, value in PLAN["rlimits"]:
        soft = int(value)
        hard = soft + 1 if name == "RLIMIT_CPU" else soft  # SIGXCPU at soft, SIGKILL at hard
        resource.setrlimit(getattr(resource, name), (soft, hard))
    for name, content in BUNDLE["files"].items():
        with open(name, "wb") as handle:
            handle.write(content if isinstance(content, bytes) else content.encode("utf-8"))
    import site  # -S kept site-packages off sys.path; give the program exit(), quit(), help()

    site.setquit()
    site.setcopyright()
    site.sethelper()
    os.environ.clear()
    os.environ.update(PLAN["env"])
    sys.executable = PLAN["executable"]
    sys.argv = ["main.py", *BUNDLE["args"], *map(str, PLAN["program_fds"])]
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # The files also reach the program in memory (``__files__``), which no other run can touch.
    namespace = {
        "__name__": "__main__",
        "__file__": "main.py",
        "__builtins__": __builtins__,
        "__files__": BUNDLE.pop("files"),
    }
    code = compile(BUNDLE.pop("script"), "main.py", "exec")
    BUNDLE.clear()
    exec(code, namespace)


def _program_process():
    """G, in both modes: drop privileges, run the program, exit with its status."""
    keep = [0, 1, 2, *PLAN["program_fds"]]
    try:
        _drop_privileges()
        # Namespaced: dumpable, so the program may read its own /proc/self (setuid cleared it).
        # Weak: not dumpable, so other programs of the same user cannot ptrace this one.
        _prctl(PR_SET_DUMPABLE, 1 if PLAN["isolate"] else 0)
    except BaseException as exc:
        print(f"sandbox setup failed: {exc}", file=sys.stderr)
        os._exit(SETUP_FAILED)
    try:
        _run_program(keep)
    except SystemExit as exc:
        code = exc.code
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
        _flush()
        os._exit(code & 0xFF)
    except BaseException:
        import traceback

        traceback.print_exc()
        _flush()
        os._exit(1)
    _flush()
    os._exit(0)


def _flush():
    for stream in (sys.stdout, sys.stderr):
        try:  # noqa: SIM105 (no contextlib: start-up time)
            stream.flush()
        except BaseException:
            pass


def _init_process(lifeline):
    """C: PID 1 of the run's PID namespace."""
    _die_with_parent(lifeline)
    os.close(lifeline)
    os.umask(0o022)
    _prctl(PR_SET_DUMPABLE, 0)
    _build_root(PLAN["fs"])
    os.chdir(PLAN["fs"]["workdir"])
    child = os.fork()
    if child == 0:
        _program_process()
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    _close_fds_except([0, 1, 2])
    os._exit(_wait_for(child))


def _namespace_process(ready_w, mapped_r):
    """C1: make the namespaces, wait for P to map our ids, fork PID 1."""
    _die_with_parent()
    flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    if PLAN["network"]:
        flags |= CLONE_NEWNET
    _check(LIBC.unshare(flags), "unshare")
    os.write(ready_w, b"u")
    if os.read(mapped_r, 1) != b"m":
        raise SetupError("the parent did not map the user namespace")
    os.close(ready_w)
    os.close(mapped_r)
    lifeline_r, lifeline_w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(lifeline_w)
        _init_process(lifeline_r)
    os.close(lifeline_r)
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    _close_fds_except([0, 1, 2, lifeline_w])
    os._exit(_wait_for(child))


def _guarded(function, *args):
    try:
        function(*args)
    except BaseException as exc:
        print(f"sandbox setup failed: {exc}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(SETUP_FAILED)


def main():
    if not PLAN["isolate"]:
        try:
            os.chdir(PLAN["workdir"])
        except BaseException as exc:
            print(f"sandbox setup failed: {exc}", file=sys.stderr)
            os._exit(SETUP_FAILED)
        _program_process()
    ready_r, ready_w = os.pipe()
    mapped_r, mapped_w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(ready_r)
        os.close(mapped_w)
        _guarded(_namespace_process, ready_w, mapped_r)
    os.close(ready_w)
    os.close(mapped_r)
    try:
        if os.read(ready_r, 1) != b"u":
            raise SetupError("the namespaces could not be created")
        for name, text in (
            ("setgroups", PLAN["setgroups"]),
            ("uid_map", PLAN["uid_map"]),
            ("gid_map", PLAN["gid_map"]),
        ):
            if text:
                with open(f"/proc/{child}/{name}", "w") as handle:
                    handle.write(text)
        os.write(mapped_w, b"m")
    except BaseException as exc:
        print(f"sandbox setup failed: {exc}", file=sys.stderr)
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os._exit(SETUP_FAILED)
    os.close(mapped_w)
    os.close(ready_r)
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    _close_fds_except([0, 1, 2])
    os._exit(_wait_for(child))


main()
