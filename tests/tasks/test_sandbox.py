"""The sandboxed runner: limits, timeouts that kill every process, captured and capped output."""

from __future__ import annotations

import os
import time
import uuid

import pytest

from vpd_lightning.tasks.sandbox import SandboxLimits, launch_plan, run_python

FAST = SandboxLimits(timeout_s=2.0, cpu_s=2)


def test_runs_in_fresh_temp_dir_with_scrubbed_env(monkeypatch):
    monkeypatch.setenv("VPD_SECRET_TOKEN", "hunter2")
    script = (
        "import os, sys\nprint(os.getcwd())\nprint(sorted(os.environ))\nprint(sys.stdin.read())"
    )
    result = run_python(script, limits=FAST)
    cwd, env_keys, stdin = result.output.splitlines()[:3] + [""] * (
        3 - len(result.output.splitlines()[:3])
    )
    assert result.returncode == 0, result.output
    assert "vpd-sandbox-" in cwd and not os.path.exists(cwd)
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


def test_timeout_kills_the_whole_process_group_even_escaped_children():
    marker = f"vpd-escapee-{uuid.uuid4().hex}"
    script = (
        "import os, sys\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        f"    os.execv(sys.executable, [sys.executable, '-c', 'while True: pass', {marker!r}])\n"
        "while True:\n    pass\n"
    )
    start = time.monotonic()
    result = run_python(script, limits=SandboxLimits(timeout_s=1.0, cpu_s=5))
    assert result.timed_out and time.monotonic() - start < 4
    if launch_plan().network_isolated:  # own PID namespace: the escaped child dies with it
        time.sleep(0.2)
        assert _processes_with(marker) == []


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


@pytest.mark.skipif(
    not launch_plan().network_isolated, reason="no unprivileged network namespace here"
)
def test_no_network():
    script = (
        "import socket\n"
        "try:\n    socket.create_connection(('1.1.1.1', 53), timeout=1)\n    print('connected')\n"
        "except OSError as exc:\n    print('blocked', exc)"
    )
    result = run_python(script, limits=FAST)
    assert "blocked" in result.output


@pytest.mark.parametrize("field", ["timeout_s", "cpu_s", "memory_mb", "open_files", "processes"])
def test_bad_limits_are_rejected(field):
    with pytest.raises(ValueError, match=field):
        SandboxLimits(**{field: 0})
