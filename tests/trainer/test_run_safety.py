"""Real runs killed for real: checkpoints survive kill -9 and full disks, SIGTERM saves and exits
non-zero, `--ckpt_path last` resumes, and a run without a terminal logs one line per step.

Each test starts `python -m vpd_lightning fit --config <tiny config>` as a subprocess.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from vpd_lightning.export import policy_state_dict
from vpd_lightning.run.checks import load_checkpoint_file

ROOT = Path(__file__).resolve().parents[2]
SHM = Path("/dev/shm")
pytestmark = pytest.mark.slow


def write_config(folder: Path, save_dir: Path, ckpt_dir: Path | None = None, **checkpoint) -> Path:
    """configs/tiny.yaml with its logs under `save_dir` and the given ModelCheckpoint options."""
    config = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(save_dir)
    options = {"save_last": True, "every_n_train_steps": 1, **checkpoint}
    if ckpt_dir is not None:
        options["dirpath"] = str(ckpt_dir)
    config["trainer"]["callbacks"][0]["init_args"] = options
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start(
    config: Path, cwd: Path, *args: str, tmpdir: Path | None = None, env: dict | None = None
) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    command = [sys.executable, "-m", "vpd_lightning", "fit", "--config", str(config)]
    command += ["--evaluate_before_after", "false", *args]
    return subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=(cwd / "stdout.txt").open("w"),
        stderr=(cwd / "stderr.txt").open("w"),
    )


def finish(process: subprocess.Popen, cwd: Path, timeout: float = 240) -> tuple[int, str, str]:
    code = process.wait(timeout=timeout)
    return code, (cwd / "stdout.txt").read_text(), (cwd / "stderr.txt").read_text()


def whole(path: Path) -> int:
    """The global step of a complete checkpoint (file or sharded folder); fails on a broken one."""
    checkpoint = load_checkpoint_file(path)
    assert policy_state_dict(path), path  # a sharded folder's shards and .metadata read too
    return int(checkpoint["global_step"])


def test_sigterm_mid_step_saves_exits_nonzero_and_resumes_with_ckpt_path_last(tmp_path):
    config = write_config(tmp_path, tmp_path / "runs", every_n_train_steps=100)
    run = start(config, tmp_path, "--trainer.max_steps", "8")
    deadline = time.monotonic() + 180
    while "step 2/8" not in (tmp_path / "stdout.txt").read_text():
        assert run.poll() is None and time.monotonic() < deadline, "no step line"
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)  # during step 3
    sent = time.monotonic()
    code, out, err = finish(run, tmp_path)
    stopped_after = time.monotonic() - sent

    assert code == 128 + signal.SIGTERM, err[-2000:]
    assert stopped_after < 60
    lines = [line for line in err.splitlines() if "stopped by SIGTERM" in line]
    assert len(lines) == 1, err[-2000:]
    step = int(re.search(r"after step (\d+) of 8", lines[0]).group(1))
    assert 3 <= step < 8, lines
    last = tmp_path / "runs/tiny/version_0/checkpoints/last.ckpt"
    assert str(last.relative_to(tmp_path)) in lines[0] or str(last) in lines[0]
    assert whole(last) == step
    # no terminal: one plain line per logged step, with reward, losses, s/step and time left
    step_lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(step_lines) == step, out[-2000:]
    pattern = r"step (\d+)/8  reward \S+  mstep/loss \S+(  estep/loss \S+)?  [\d.]+ s/step  left \d+:\d\d:\d\d"
    assert all(re.fullmatch(pattern, line) for line in step_lines), step_lines
    assert "estep/loss" in step_lines[1] and "estep/loss" not in step_lines[0]  # E-step every 2

    resumed = start(config, tmp_path, "--trainer.max_steps", "8", "--ckpt_path", "last")
    code, out, err = finish(resumed, tmp_path)
    assert code == 0, err[-3000:]
    assert re.search(r"steps:\s+8", out)
    assert [line.split("/")[0] for line in out.splitlines() if line.startswith("step ")] == [
        f"step {s}" for s in range(step + 1, 9)
    ]
    assert whole(tmp_path / "runs/tiny/version_1/checkpoints/last.ckpt") == 8


def other_filesystem(tmp_path: Path) -> Path:
    """A folder on another filesystem than `tmp_path` (the child's TMPDIR): /dev/shm here."""
    if not SHM.is_dir() or os.stat(SHM).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the temporary folder")
    folder = SHM / f"vpd-test-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    return folder


@pytest.mark.parametrize("strategy", ["auto", "fsdp2"])
def test_kill_9_during_a_checkpoint_write_leaves_the_previous_or_the_new_one_whole(
    tmp_path, strategy
):
    import shutil

    save_dir = other_filesystem(tmp_path)
    child_tmp = tmp_path / "child-tmp"
    child_tmp.mkdir()
    try:
        for attempt in range(3):
            cwd = tmp_path / f"attempt{attempt}"
            cwd.mkdir()
            shutil.rmtree(save_dir / "tiny", ignore_errors=True)
            config = write_config(cwd, save_dir)
            args = ["--trainer.max_steps", "40", "--trainer.strategy", strategy]
            run = start(config, cwd, *args, "--trainer.limit_val_batches", "0", tmpdir=child_tmp)
            folder = save_dir / "tiny/version_0/checkpoints"
            caught = False
            while run.poll() is None:
                names = os.listdir(folder) if folder.is_dir() else []
                if "last.ckpt" in names and (  # a previous checkpoint exists
                    any(".tmp-" in name for name in names) or _changed(folder / "last.ckpt")
                ):
                    run.kill()
                    caught = True
                    break
            run.wait(timeout=60)
            assert caught, (cwd / "stderr.txt").read_text()[-2000:]
            if any(".tmp-" in name for name in os.listdir(folder)):
                break  # the kill landed during a write
        else:
            pytest.fail("no kill -9 landed during a checkpoint write in 3 runs")

        checkpoints = sorted(folder.glob("*.ckpt"))
        assert checkpoints, os.listdir(folder)
        steps = {p.name: whole(p) for p in checkpoints}  # every checkpoint there is complete
        # nothing checkpoint-sized left in the child's TMPDIR (Lightning's writer staged there)
        assert [p for p in child_tmp.rglob("*") if p.is_file() and p.stat().st_size > 2**20] == []

        resume_from = max(steps.values())
        resumed = start(
            config,
            cwd,
            *["--trainer.max_steps", str(resume_from + 1), "--trainer.strategy", strategy],
            *["--trainer.limit_val_batches", "0", "--ckpt_path", "last"],
            tmpdir=child_tmp,
        )
        code, out, err = finish(resumed, cwd)
        assert code == 0, err[-3000:]
        assert re.search(rf"steps:\s+{resume_from + 1}\b", out)
        new_folder = save_dir / "tiny/version_1/checkpoints"  # the resumed run's
        assert whole(new_folder / "last.ckpt") == resume_from + 1
        assert not [p for p in new_folder.iterdir() if ".tmp-" in p.name]
    finally:
        shutil.rmtree(save_dir, ignore_errors=True)


_seen: dict[Path, tuple] = {}


def _changed(path: Path) -> bool:
    """Whether `path`'s size or mtime differ from the last look (a write under way or done)."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return False
    now = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    before = _seen.setdefault(path, now)
    return before != now


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 3 MiB tmpfs: room for one tiny checkpoint (2.1 MiB), not for a second beside it."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_gives_one_line_and_keeps_the_previous_checkpoint(tmp_path, tiny_tmpfs):
    config = write_config(tmp_path, tmp_path / "runs", tiny_tmpfs, save_top_k=0)
    run = start(config, tmp_path, "--trainer.max_steps", "4", tmpdir=Path(tempfile.gettempdir()))
    code, _, err = finish(run, tmp_path)

    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("vpd_lightning: error:")]
    assert len(lines) == 1, err[-2000:]
    assert f"checkpoint folder {tiny_tmpfs}: disk full" in lines[0]
    assert re.search(r"needs 2\.\d MiB and [01]\.\d MiB is free", lines[0]), lines[0]
    assert sorted(p.name for p in tiny_tmpfs.iterdir()) == ["last.ckpt"]  # no partial file
    assert whole(tiny_tmpfs / "last.ckpt") == 1  # the previous checkpoint, whole


def test_slurm_requeue_signal_saves_at_the_end_of_the_step_and_requeues(tmp_path):
    """Lightning saves and requeues from inside its SIGUSR1 handler (mid-step): deferred here."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"  # stands in for SLURM's: records the requeue request
    scontrol.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/scontrol.txt\n')
    scontrol.chmod(0o755)
    slurm = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NAME": "train",
        "SLURM_NODELIST": "localhost",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
    }
    config = write_config(tmp_path, tmp_path / "runs", every_n_train_steps=100)
    run = start(config, tmp_path, "--trainer.max_steps", "8", env=slurm)
    while "step 1/8" not in (tmp_path / "stdout.txt").read_text():
        assert run.poll() is None, (tmp_path / "stderr.txt").read_text()[-2000:]
        time.sleep(0.05)
    run.send_signal(signal.SIGUSR1)
    code, _, err = finish(run, tmp_path)

    assert code == 128 + signal.SIGUSR1, err[-2000:]
    line = next(line for line in err.splitlines() if "stopped by SIGUSR1" in line)
    step = int(re.search(r"after step (\d+) of 8", line).group(1))
    assert whole(tmp_path / "hpc_ckpt_1.ckpt") == step >= 2
    assert (tmp_path / "scontrol.txt").read_text().split() == ["requeue", "4242"]
