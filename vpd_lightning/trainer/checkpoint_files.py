"""Reading a checkpoint someone else may have written: nothing in it runs, nothing expands past a
budget, and nothing corrupt loads.

A checkpoint path names a file (a `torch.save` zip archive) or a sharded (fsdp2) folder: shard
files of `torch.distributed.checkpoint` (DCP), its `.metadata` (a pickle) and `meta.pt` (a
`torch.save` archive). Before anything is unpickled or expanded:
- an archive's zip directory is read from its end record: at most `MAX_MEMBERS` members, each
  stored uncompressed (as `torch.save` writes them) inside the file, so what loads is at most the
  file's own size, and its pickle at most `MAX_PICKLE_BYTES`; archives are then read with
  `weights_only=True`, which constructs only tensors and plain containers;
- a folder holds only regular files named in its `checksums.json`, each matching its SHA-256;
  `.metadata` (at most `MAX_METADATA_BYTES`) is unpickled by `MetadataUnpickler`, which constructs
  only DCP's metadata classes, torch dtypes and sizes, and refuses any other global; every item it
  names lies inside its shard file, has no transform (DCP's compression), and is itself a checked
  archive that loads with `weights_only=True` (DCP reads non-tensor items with a full unpickler).
Once the model is built, `check_size` holds the whole checkpoint to `size_budget(model)`. A file
carries `CHECKSUM_KEY`, a SHA-256 of its content (`seal`), which `verify_checksum` recomputes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import torch

from vpd_lightning.errors import UserInputError

SHARDED_METADATA = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint
DCP_METADATA = ".metadata"
MANIFEST = "checksums.json"
CHECKSUM_KEY = "vpd_checksum"
MAX_MEMBERS = 100_000
MAX_PICKLE_BYTES = 32 * 2**20
MAX_METADATA_BYTES = 16 * 2**20
MAX_MANIFEST_BYTES = 2**20
BUDGET_PER_PARAMETER_BYTE = 8  # weights, a snapshot, two Adam states for each of two optimizers
BUDGET_SLACK = 64 * 2**20  # counters, hyper-parameters, the E-step buffer, RNG states
ALLOWED_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a lookup of torch.layout by name
    ("pathlib", "PosixPath"),  # storage_meta.checkpoint_id
    ("pathlib", "WindowsPath"),
    ("pathlib._local", "PosixPath"),  # Python 3.13's module for them
    ("pathlib._local", "WindowsPath"),
    ("collections", "OrderedDict"),
}


class CheckpointError(UserInputError):
    """A checkpoint that is refused before (or instead of) being loaded."""


def size_budget(parameter_bytes: int) -> int:
    """The most bytes a checkpoint of a model with `parameter_bytes` of weights may hold."""
    return BUDGET_PER_PARAMETER_BYTE * parameter_bytes + BUDGET_SLACK


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's parameters and buffers (weights shared by two names counted once)."""
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def check_size(path: str | Path, budget: int) -> None:
    """The checkpoint's files hold at most `budget` bytes in all."""
    path = Path(path)
    files = [f for f in path.iterdir() if f.is_file()] if path.is_dir() else [path]
    total = sum(f.stat().st_size for f in files)
    if total > budget:
        raise CheckpointError(
            f"ckpt_path {path}: {total / 2**20:.1f} MiB, more than the {budget / 2**20:.1f} MiB "
            f"a checkpoint of this model can hold ({BUDGET_PER_PARAMETER_BYTE} x its weights + "
            f"{BUDGET_SLACK // 2**20} MiB); it was written for a larger model or is not a checkpoint"
        )


def read_archive(file: Path, name: str | None = None) -> Any:
    """A `torch.save` archive's content, after `check_archive`, read with `weights_only=True`."""
    name = name or str(file)
    with open(file, "rb") as handle:
        check_archive(handle, os.fstat(handle.fileno()).st_size, name)
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        raise CheckpointError(
            f"ckpt_path {name}: not a checkpoint of this trainer (it holds objects other than "
            "tensors and plain values, or is broken); give a .ckpt file from a run's checkpoints/"
            " folder"
        ) from None


def check_archive(handle: BinaryIO, size: int, name: str) -> None:
    """The zip directory of `handle` (`size` bytes) is one `torch.load` expands no further: a
    bounded number of stored (uncompressed) members, inside the file, not overlapping."""
    where = f"ckpt_path {name}"
    if size == 0:
        raise CheckpointError(f"{where}: the file is empty (0 bytes), not a checkpoint")
    handle.seek(0)
    end = zipfile._EndRecData(handle)  # the end record alone, before any member is parsed
    if end is None:
        raise CheckpointError(
            f"{where}: not a checkpoint of this trainer (no zip directory: torch.save writes a "
            "zip archive); give a .ckpt file from a run's checkpoints/ folder"
        )
    members = end[zipfile._ECD_ENTRIES_TOTAL]
    if members > MAX_MEMBERS or end[zipfile._ECD_SIZE] > size:
        raise CheckpointError(
            f"{where}: its zip directory lists {members} members (at most {MAX_MEMBERS}) in "
            f"{end[zipfile._ECD_SIZE]} bytes of a {size}-byte file; not a checkpoint"
        )
    try:
        infos = zipfile.ZipFile(handle).infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
        raise CheckpointError(f"{where}: a broken zip archive ({error})") from None
    total = 0
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(
                f"{where}: member {info.filename} is compressed (method {info.compress_type}); "
                "torch.save stores members uncompressed, and a compressed one could expand far "
                "beyond the file: refused"
            )
        if info.header_offset + info.file_size > size or info.file_size != info.compress_size:
            raise CheckpointError(f"{where}: member {info.filename} lies outside the file")
        if info.filename.endswith("data.pkl") and info.file_size > MAX_PICKLE_BYTES:
            raise CheckpointError(
                f"{where}: its pickle is {info.file_size} bytes, more than the "
                f"{MAX_PICKLE_BYTES // 2**20} MiB this trainer writes; refused"
            )
        total += info.file_size
    if total > size:
        raise CheckpointError(
            f"{where}: its members declare {total} bytes in a {size}-byte file (overlapping "
            "members expand what is read); refused"
        )


def content_digest(content: object) -> str:
    """SHA-256 of a checkpoint's content: every tensor's dtype, shape and bytes, every other
    value's repr, in the order the containers hold them (the order `torch.load` restores)."""
    digest = hashlib.sha256()
    stack = [content]
    while stack:
        value = stack.pop()
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"T{tensor.dtype}{tuple(value.shape)};".encode())
            digest.update(tensor.view(torch.uint8).numpy().data)
        elif isinstance(value, dict):
            digest.update(f"D{len(value)};".encode())
            for key, item in reversed(value.items()):
                stack += [item, key]
        elif isinstance(value, list | tuple):
            digest.update(f"{type(value).__name__[0]}{len(value)};".encode())
            stack += reversed(value)
        else:
            digest.update(f"{type(value).__name__}:{value!r};".encode())
    return digest.hexdigest()


def seal(checkpoint: dict) -> None:
    """Add the checksum of everything else in `checkpoint` (the last thing written into it)."""
    checkpoint.pop(CHECKSUM_KEY, None)
    checkpoint[CHECKSUM_KEY] = content_digest(checkpoint)


def verify_checksum(checkpoint: dict, name: str | Path) -> None:
    """The checksum `seal` wrote matches the content read back."""
    content = dict(checkpoint)
    expected = content.pop(CHECKSUM_KEY, None)
    if expected is None:
        raise CheckpointError(
            f"ckpt_path {name}: carries no checksum ({CHECKSUM_KEY}), so corruption could not "
            "be detected; it was written by an older vpd_lightning or edited: use a checkpoint "
            "this version wrote, or `python -m vpd_lightning seal` one you trust"
        )
    if content_digest(content) != expected:
        raise CheckpointError(
            f"ckpt_path {name}: its content does not match its checksum (bytes changed after it "
            "was written: a bad disk, a partial copy or an edit); use another checkpoint, e.g. "
            "an earlier one of the run"
        )


def file_digest(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while chunk := handle.read(2**22):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_text(folder: Path) -> str:
    """The `checksums.json` of a sharded folder: the SHA-256 of each of its files."""
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.name != MANIFEST)
    return json.dumps({"sha256": {f.name: file_digest(f) for f in files}}, indent=1)


def write_manifest(folder: Path) -> None:
    (folder / MANIFEST).write_text(manifest_text(folder), encoding="utf-8")


def check_regular_files(folder: Path) -> list[Path]:
    """The folder's entries, every one a regular file (no folder, link or device)."""
    entries = list(folder.iterdir())
    odd = [e.name for e in entries if not e.is_file() or e.is_symlink()]
    if odd:
        raise CheckpointError(
            f"ckpt_path {folder}: holds {odd[0]!r}, not a regular file; a sharded checkpoint "
            "folder holds only its shard files, .metadata, meta.pt and checksums.json"
        )
    return entries


def verify_folder(folder: Path) -> None:
    """A sharded folder whose every file is listed in its manifest and matches it, and whose DCP
    metadata and items can be loaded without running or expanding anything (module docstring)."""
    where = f"ckpt_path {folder}"
    entries = check_regular_files(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file() or manifest.stat().st_size > MAX_MANIFEST_BYTES:
        raise CheckpointError(
            f"{where}: no {MANIFEST} (at most {MAX_MANIFEST_BYTES} bytes) with its files' "
            "checksums; it was written by an older vpd_lightning or by another program "
            "(`python -m vpd_lightning seal` adds it to a folder you trust)"
        )
    try:
        listed = json.loads(manifest.read_text(encoding="utf-8")).get("sha256")
    except (ValueError, AttributeError, UnicodeDecodeError):
        listed = None
    if not isinstance(listed, dict) or not all(isinstance(v, str) for v in listed.values()):
        raise CheckpointError(f"{where}: {MANIFEST} is not a manifest of checksums")
    files = {e.name for e in entries} - {MANIFEST}
    if files != set(listed):
        extra = sorted(files ^ set(listed))
        raise CheckpointError(
            f"{where}: {MANIFEST} does not list exactly the folder's files (differs in "
            f"{extra[:3]}); a file was added, removed or renamed after it was written"
        )
    for name in sorted(files):
        if file_digest(folder / name) != listed[name]:
            raise CheckpointError(
                f"{where}: {name} does not match its checksum (bytes changed after it was "
                "written); use another checkpoint"
            )
    check_dcp_items(folder, read_dcp_metadata(folder))


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata`, constructing only its own classes, dtypes and sizes."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_METADATA_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a DCP metadata class")


def read_dcp_metadata(folder: Path) -> Any:
    """The folder's DCP `Metadata`, read by `MetadataUnpickler` (nothing else is constructed)."""
    from torch.distributed.checkpoint.metadata import Metadata

    file = folder / DCP_METADATA
    where = f"ckpt_path {folder}"
    if not file.is_file() or file.stat().st_size > MAX_METADATA_BYTES:
        raise CheckpointError(
            f"{where}: no {DCP_METADATA} of at most {MAX_METADATA_BYTES // 2**20} MiB; not a "
            "sharded checkpoint of this trainer"
        )
    try:
        with open(file, "rb") as handle:
            metadata = MetadataUnpickler(handle).load()
    except Exception as error:
        raise CheckpointError(
            f"{where}: its {DCP_METADATA} is not plain DCP metadata ({_first_line(error)}); "
            "refused unread"
        ) from None
    if not (isinstance(metadata, Metadata) and isinstance(metadata.storage_data, dict)):
        raise CheckpointError(f"{where}: its {DCP_METADATA} holds no DCP Metadata")
    return metadata


def check_dcp_items(folder: Path, metadata: Any) -> None:
    """Every item lies inside a shard file of the folder, has no transform, and is an archive
    that `check_archive` accepts; non-tensor items also load with `weights_only=True`."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    where = f"ckpt_path {folder}"
    for index, info in metadata.storage_data.items():
        shard = folder / str(info.relative_path)
        offset, length = info.offset, info.length
        if (
            shard.parent != folder
            or not shard.is_file()
            or not (isinstance(offset, int) and isinstance(length, int))
            or offset < 0
            or length <= 0
            or offset + length > shard.stat().st_size
            or info.transform_descriptors
        ):
            raise CheckpointError(
                f"{where}: item {index.fqn} points outside its shard files or asks for a "
                f"transform ({info.relative_path}, offset {offset}, length {length}); refused"
            )
        is_bytes = isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata)
        with open(shard, "rb") as handle:
            window = _Window(handle, offset, length)
            check_archive(window, length, f"{folder} item {index.fqn}")
            if is_bytes:
                window.seek(0)
                try:
                    torch.load(io.BytesIO(window.read()), weights_only=True)
                except Exception as error:
                    raise CheckpointError(
                        f"{where}: item {index.fqn} does not load with weights_only "
                        f"({_first_line(error)}); refused unread"
                    ) from None


class _Window(io.RawIOBase):
    """A read-only, seekable view of `length` bytes of `handle` from `offset`."""

    def __init__(self, handle: BinaryIO, offset: int, length: int) -> None:
        self.handle, self.offset, self.length, self.position = handle, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, position: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.position, 2: self.length}[whence]
        self.position = max(0, base + position)
        return self.position

    def tell(self) -> int:
        return self.position

    def read(self, size: int = -1) -> bytes:
        left = max(0, self.length - self.position)
        size = left if size is None or size < 0 else min(size, left)
        self.handle.seek(self.offset + self.position)
        data = self.handle.read(size)
        self.position += len(data)
        return data


def load_sharded_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The model weights (`state_dict`) of a verified sharded folder, assembled in this process,
    read through `_SafeReader`/`_SafePlanner` so that the metadata and items are read as checked."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    verify_folder(folder)
    loaded: dict = {}
    _load_state_dict(
        loaded,
        storage_reader=_safe_reader(folder),
        planner=_safe_planner(keys={"state_dict"}),
        no_dist=True,
    )
    return loaded["state_dict"]


def _safe_reader(folder: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        """DCP's reader with `.metadata` read by `MetadataUnpickler`."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata = read_dcp_metadata(folder)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(folder)


def _safe_planner(keys: set[str]) -> Any:
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner

    class SafePlanner(_EmptyStateDictLoadPlanner):
        """DCP's planner with non-tensor items read by `torch.load(weights_only=True)`."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            from torch.distributed.checkpoint._traverse import set_element

            loaded = torch.load(value, weights_only=True)
            fqn = read_item.dest_index.fqn
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], loaded)
            else:
                self.state_dict[fqn] = loaded

    return SafePlanner(keys=keys)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__
