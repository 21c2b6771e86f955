"""Checkpoints written so that a crash, a kill or a full disk never leaves a broken newest one.

Lightning's own writer serialises into `$TMPDIR` and moves the file into place, which across
filesystems is a copy into the final path: a `kill -9` during it leaves a truncated `last.ckpt`.
Here every checkpoint is written next to its target under a hidden temporary name, flushed and
fsynced, then renamed onto the target (one `rename` on one filesystem: atomic), and the folder is
fsynced. A sharded (fsdp2) folder is written whole under a temporary name and swapped with the
old folder in one `renameat2(RENAME_EXCHANGE)` where the kernel has it. So at any instant the
target holds the previous checkpoint or the new one, whole. A full disk removes the temporary
file and raises `CheckpointDiskFullError`, one line naming the folder and the space needed.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from vpd_lightning.errors import UserInputError
from vpd_lightning.trainer.checkpoint_files import CHECKSUM_KEY, read_archive, verify_checksum

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
TEMP_MARK = ".tmp-"
RENAME_EXCHANGE = 2  # linux/fs.h
AT_FDCWD = -100


class CheckpointDiskFullError(UserInputError):
    """The checkpoint's folder has not enough free space; the previous checkpoint is kept."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` that writes each file next to its target and renames it into place."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        write_file_atomically(Path(path), lambda file: torch.save(checkpoint, file), checkpoint)

    def load_checkpoint(
        self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """The checkpoint read by `checkpoint_files` (nothing runs, nothing expands past the
        file) with its checksum verified."""
        checkpoint = read_archive(Path(path))
        verify_checksum(checkpoint, path)
        checkpoint.pop(CHECKSUM_KEY)
        return checkpoint


def temp_path(target: Path) -> Path:
    """A hidden sibling of `target` that no checkpoint glob (`*.ckpt`, `last*`) matches."""
    return target.with_name(f".{target.name}{TEMP_MARK}{socket.gethostname()}-{os.getpid()}")


def remove_stale_temps(target: Path) -> None:
    """Delete temporaries in `target`'s folder left by killed writers on this host."""
    mark = f"{TEMP_MARK}{socket.gethostname()}-"
    for leftover in target.parent.glob(f".*{mark}*"):
        pid = leftover.name.rsplit(mark, 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            _remove(leftover)


def write_file_atomically(target: Path, write: Callable[[Any], None], content: object) -> None:
    """Run `write(file)` into a temporary next to `target`, fsync it and rename it onto `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    temp = temp_path(target)
    try:
        with open(temp, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, target)
        fsync_folder(target.parent)
    except Exception as error:
        _remove(temp)
        # torch.save's zip writer reports a full disk as a RuntimeError about file positions
        needed = serialized_size(content) if isinstance(error, OSError | RuntimeError) else None
        if no_space(error) or (needed is not None and needed > _free(target.parent)):
            raise disk_full(target.parent, needed) from None
        raise
    except BaseException:
        _remove(temp)
        raise


def replace_folder_atomically(temp: Path, target: Path) -> None:
    """Move the complete folder `temp` onto `target`: fsync every file, then swap the two in one
    `renameat2(RENAME_EXCHANGE)` and delete the old one. Without that call (not Linux, an old
    kernel or a filesystem that lacks it), the old folder is renamed aside first, so for an
    instant only `target.old-*` holds the previous checkpoint."""
    for file in temp.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_folder(temp)
    if not target.exists():
        os.replace(temp, target)
    elif _exchange(temp, target):
        shutil.rmtree(temp)  # now holds the previous checkpoint
    else:
        aside = target.with_name(f"{target.name}.old-{os.getpid()}")
        os.replace(target, aside)
        os.replace(temp, target)
        shutil.rmtree(aside)
    fsync_folder(target.parent)


def no_space(error: BaseException) -> bool:
    """Whether an error, or one it wraps (torch.distributed.checkpoint does), is a full disk."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [error]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in NO_SPACE:
            return True
        if "No space left on device" in str(current):
            return True
        stack += [current.__cause__, current.__context__]
    return False


def disk_full(folder: Path, needed: int | None) -> CheckpointDiskFullError:
    free = _free(folder)
    need = f"needs {_mib(needed)} and" if needed is not None else "does not fit:"
    return CheckpointDiskFullError(
        f"checkpoint folder {folder}: disk full, the checkpoint {need} {_mib(free)} is free; "
        "the previous checkpoint is kept. Free space there, or set the ModelCheckpoint callback's "
        "dirpath to a folder with room, and resume with --ckpt_path last"
    )


def serialized_size(content: object) -> int | None:
    """Bytes `torch.save(content)` writes, counted without keeping them (None for no content)."""
    if content is None:
        return None
    counter = _ByteCounter()
    torch.save(content, counter)
    return counter.size


def fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _ByteCounter:
    """A write-only file that counts bytes: the size a checkpoint needs, in no memory."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def _exchange(a: Path, b: Path) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    return result == 0


def _free(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"
