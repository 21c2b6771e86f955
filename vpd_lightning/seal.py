"""`python -m vpd_lightning seal CKPT`: adopt a checkpoint that carries no checksum.

Every load verifies a checkpoint's checksum (`trainer/checkpoint_files.py`), so one written before
checksums existed is refused. Sealing vouches for its bytes as they are now: it reads the
checkpoint under the same bounds as a load (nothing in it runs, nothing expands past a budget, and
it must be a VPDModule checkpoint), then adds the checksum: a file is rewritten with
`vpd_checksum` (next to itself, then renamed into place); a sharded folder gets its
`checksums.json`. A checkpoint that already carries one is verified and left alone: a mismatch is
corruption, which sealing would hide.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch

from vpd_lightning.errors import UserInputError
from vpd_lightning.run.checks import load_checkpoint_file, sharded_metadata
from vpd_lightning.trainer.checkpoint_files import (
    CHECKSUM_KEY,
    MANIFEST,
    check_dcp_items,
    check_regular_files,
    manifest_text,
    read_dcp_metadata,
    seal,
    verify_checksum,
    verify_folder,
)
from vpd_lightning.trainer.checkpoint_io import (
    CheckpointDiskFullError,
    remove_stale_temps,
    write_file_atomically,
)


def seal_main(args: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vpd_lightning seal",
        description="Add the checksum that loading verifies to a checkpoint written without one "
        "(by an older vpd_lightning); one that has a checksum is only verified.",
    )
    parser.add_argument("checkpoint", help="a .ckpt file, or a sharded (fsdp2) checkpoint folder")
    path = Path(parser.parse_args(args).checkpoint)
    done = seal_checkpoint(path)
    print(f"vpd_lightning: {path}: {done}")


def seal_checkpoint(path: Path) -> str:
    """Seal the checkpoint at `path` (module docstring); says what was done."""
    if path.is_dir():
        return _seal_folder(path)
    checkpoint = load_checkpoint_file(path)
    if CHECKSUM_KEY in checkpoint:
        verify_checksum(checkpoint, path)
        return "already sealed; its checksum matches"
    seal(checkpoint)
    # through a link (Lightning's last.ckpt may be one): the file it names, so the link stays
    _write(path.resolve(), lambda file: torch.save(checkpoint, file), checkpoint)
    return f"sealed (added {CHECKSUM_KEY})"


def _seal_folder(folder: Path) -> str:
    if (folder / MANIFEST).exists():
        verify_folder(folder)
        return f"already sealed; every file matches its {MANIFEST}"
    metadata = sharded_metadata(folder)
    remove_stale_temps(folder / MANIFEST)  # a killed seal's temporary is not a shard
    check_regular_files(folder)
    check_dcp_items(folder, read_dcp_metadata(folder))
    load_checkpoint_file(metadata)  # bounded, and a VPDModule checkpoint's
    text = manifest_text(folder).encode("utf-8")
    _write(folder / MANIFEST, lambda file: file.write(text), text)
    return f"sealed (wrote {MANIFEST})"


def _write(target: Path, write: Callable[[BinaryIO], object], content: object) -> None:
    """Next to `target`, then renamed onto it: a failure leaves the checkpoint as it was."""
    try:
        write_file_atomically(target, write, content)
    except (OSError, CheckpointDiskFullError) as error:
        why = "disk full" if isinstance(error, CheckpointDiskFullError) else error.strerror
        raise UserInputError(
            f"ckpt_path {target}: cannot be rewritten ({why or error}); it was left as it was: "
            "free space or make it writable, and run seal again"
        ) from None
