"""Foreign checkpoints through every entry point (fit --ckpt_path, predict, export): nothing in
them runs, nothing expands past the budget, corrupt or mismatched ones are one line (exit 2)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

import vpd_lightning.export as export_lib
from vpd_lightning.cli import main
from vpd_lightning.errors import UserInputError
from vpd_lightning.export import export
from vpd_lightning.trainer.checkpoint_files import (
    MAX_MEMBERS,
    content_digest,
    seal,
    verify_folder,
    write_manifest,
)
from vpd_lightning.trainer.checkpoint_io import temp_path

from .test_bad_input import TINY, refused

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


class Payload:
    """Unpickles by calling os.system: what a crafted checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def honest(tmp_path_factory) -> Path:
    """One step of tiny.yaml, checkpointed by the CLI."""
    run = tmp_path_factory.mktemp("honest")
    cwd = os.getcwd()
    os.chdir(run)
    try:
        main(
            ["fit", "--config", TINY, "--trainer.max_steps", "1"]
            + ["--trainer.enable_progress_bar", "false", "--evaluate_before_after", "false"]
        )
    finally:
        os.chdir(cwd)
    return run / "runs/tiny/version_0/checkpoints/last.ckpt"


def sharded(honest: Path, folder: Path, extra: dict | None = None) -> Path:
    """A sharded folder with the honest checkpoint's weights (plus `extra` under state_dict),
    its meta.pt and a manifest that matches: what an fsdp2 run writes, in one process."""
    full = torch.load(honest, weights_only=True)
    dcp.save(
        {"state_dict": {**full["state_dict"], **(extra or {})}},
        storage_writer=FileSystemWriter(folder),
        no_dist=True,
    )
    meta = {k: v for k, v in full.items() if k not in ("state_dict", "optimizer_states")}
    torch.save(meta, folder / "meta.pt")
    write_manifest(folder)
    return folder


def entry_points(checkpoint: Path, tmp_path: Path) -> dict[str, list[str]]:
    out = str(tmp_path / "out.jsonl")
    return {
        "export": ["export", str(checkpoint), str(tmp_path / "exported")],
        "predict": ["predict", "--config", TINY, "--ckpt_path", str(checkpoint)]
        + ["--sample.out", out, "--sample.limit", "1"],
        "fit": ["fit", "--config", TINY, "--ckpt_path", str(checkpoint)]
        + ["--trainer.max_steps", "2", "--evaluate_before_after", "false"]
        + (["--trainer.strategy", "fsdp2"] if checkpoint.is_dir() else []),
    }


@pytest.mark.parametrize("entry", ["export", "predict", "fit"])
@pytest.mark.parametrize("where", ["metadata", "item"])
def test_a_sharded_folder_that_would_run_code_is_refused_unread(
    honest, where, entry, tmp_path, capsys, monkeypatch
):
    """DCP unpickles `.metadata` and non-tensor items with a full unpickler; a crafted folder
    (with a manifest that matches) must not get to run its payload through any entry point."""
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "payload-ran"
    extra = {"policy.model.extra": Payload(marker)} if where == "item" else None
    folder = sharded(honest, tmp_path / "crafted", extra)
    if where == "metadata":
        (folder / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
        write_manifest(folder)
    line = refused(entry_points(folder, tmp_path)[entry], capsys)
    assert not marker.exists(), "the crafted checkpoint ran its code"
    expected = "is not plain DCP metadata" if where == "metadata" else "does not load with"
    assert expected in line and str(folder) in line, line


def test_an_honest_sharded_folder_exports_the_trained_weights(honest, tmp_path):
    """The safe reader is DCP's reader: an honest folder still exports, weights intact."""
    folder = sharded(honest, tmp_path / "honest")
    out = export(folder, tmp_path / "exported")
    from safetensors.torch import load_file

    weights = load_file(out / "model.safetensors")
    trained = torch.load(honest, weights_only=True)["state_dict"]
    key = next(k for k in weights if "embed" in k)
    torch.testing.assert_close(weights[key], trained[f"policy.model.{key}"])


def test_a_sharded_folder_with_a_changed_file_or_no_manifest_is_refused(honest, tmp_path):
    folder = sharded(honest, tmp_path / "s")
    verify_folder(folder)
    shard = next(folder.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(UserInputError, match=r"\.distcp does not match its checksum"):
        verify_folder(folder)
    (folder / "checksums.json").unlink()
    with pytest.raises(UserInputError, match=r"no checksums\.json"):
        verify_folder(folder)


def deflated_copy(source: Path, target: Path, padding_mib: int) -> Path:
    """`source` plus a tensor of `padding_mib` MiB of zeros, every member deflated (a zip bomb:
    the file is ~1000 times smaller than what it expands to), with a valid checksum."""
    full = torch.load(source, weights_only=True)
    full["padding"] = torch.zeros(padding_mib * 2**20, dtype=torch.uint8)
    seal(full)
    stored = target.with_suffix(".stored")
    torch.save(full, stored)
    with zipfile.ZipFile(stored) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as new:
        for info in old.infolist():
            new.writestr(info.filename, old.read(info))
    stored.unlink()
    return target


@pytest.mark.parametrize("entry", ["export", "fit"])  # predict reads it as fit does
def test_a_zip_bomb_checkpoint_is_refused_from_its_zip_directory(
    honest, entry, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    bomb = deflated_copy(honest, tmp_path / "bomb.ckpt", padding_mib=64)
    assert bomb.stat().st_size < 4 * 2**20  # the weights (random) do not compress
    line = refused(entry_points(bomb, tmp_path)[entry], capsys)
    assert "is compressed" in line and "could expand far beyond the file" in line, line


def test_an_archive_of_too_many_members_is_refused_before_its_directory_is_parsed(tmp_path, capsys):
    crowded = tmp_path / "crowded.ckpt"
    with zipfile.ZipFile(crowded, "w") as archive:
        for i in range(MAX_MEMBERS + 1):
            archive.writestr(f"a/data/{i}", b"")
    line = refused(["fit", "--config", TINY, "--ckpt_path", str(crowded)], capsys)
    assert f"lists {MAX_MEMBERS + 1} members (at most {MAX_MEMBERS})" in line


@pytest.mark.parametrize("entry", ["export", "predict", "fit"])
def test_a_checkpoint_larger_than_the_model_budget_is_refused_before_it_is_read(
    honest, entry, tmp_path, capsys, monkeypatch
):
    """Stored (uncompressed) members: honest to the file, but 80 MiB for a 0.4 MB model."""
    monkeypatch.chdir(tmp_path)
    full = torch.load(honest, weights_only=True)
    full["padding"] = torch.zeros(80 * 2**20, dtype=torch.uint8)
    seal(full)
    big = tmp_path / "big.ckpt"
    torch.save(full, big)
    del full
    line = refused(entry_points(big, tmp_path)[entry], capsys)
    assert "MiB a checkpoint of this model can hold" in line, line


def flip_embedding(honest: Path, target: Path) -> Path:
    """`honest` with the first float of the embedding's bytes set to 3e4, nothing else changed."""
    embedding = next(
        v for k, v in torch.load(honest, weights_only=True)["state_dict"].items() if "embed" in k
    )
    data = bytearray(honest.read_bytes())
    at = data.find(embedding.reshape(-1)[:4].numpy().tobytes())
    assert at > 0
    data[at : at + 4] = torch.tensor([3e4]).numpy().tobytes()
    target.write_bytes(bytes(data))
    return target


@pytest.mark.parametrize("entry", ["predict", "fit"])  # export reads it as predict does
def test_flipped_bytes_in_a_weight_are_refused_by_the_checksum(
    honest, entry, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    flipped = flip_embedding(honest, tmp_path / "flipped.ckpt")
    line = refused(entry_points(flipped, tmp_path)[entry], capsys)
    assert "does not match its checksum" in line, line


def test_the_checksum_covers_every_value_and_their_order():
    base = {"a": torch.ones(3), "b": [1, 2.5, "x", None], "c": {"d": torch.zeros(2)}}
    digest = content_digest(base)
    for changed in (
        {**base, "a": torch.tensor([1.0, 1.0, 1.5])},
        {**base, "b": [1, 2.5, "y", None]},
        {**base, "c": {"d": torch.zeros(2, dtype=torch.float64)}},
        {"b": base["b"], "a": base["a"], "c": base["c"]},
        {**base, "a": torch.ones(1, 3)},
    ):
        assert content_digest(changed) != digest
    assert content_digest({k: v for k, v in base.items()}) == digest


def resealed(honest: Path, target: Path, edit) -> Path:
    """`honest` edited by `edit`, with a fresh checksum (anyone can write one)."""
    full = torch.load(honest, weights_only=True)
    edit(full)
    seal(full)
    torch.save(full, target)
    return target


def _reshape(checkpoint: dict) -> None:
    key = next(k for k in checkpoint["state_dict"] if "embed" in k)
    checkpoint["state_dict"][key] = checkpoint["state_dict"][key][:-1].clone()


def _drop(checkpoint: dict) -> None:
    checkpoint["state_dict"].pop(next(k for k in checkpoint["state_dict"] if "embed" in k))


@pytest.mark.parametrize("entry", ["export", "predict", "fit"])
@pytest.mark.parametrize(
    ("edit", "expected"),
    [(_reshape, "has shape (259, 64), the model's is (260, 64)"), (_drop, "lacks weight(s)")],
)
def test_a_weight_of_another_shape_or_a_missing_weight_is_one_line(
    honest, edit, expected, entry, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    checkpoint = resealed(honest, tmp_path / "edited.ckpt", edit)
    line = refused(entry_points(checkpoint, tmp_path)[entry], capsys)
    assert expected in line and "not written for this model" in line, line


@pytest.mark.parametrize(
    ("key", "value"), [("global_step", -5), ("epoch", -1), ("global_step", 1.5)]
)
def test_negative_or_fractional_counters_are_refused(
    honest, key, value, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    checkpoint = resealed(honest, tmp_path / "counters.ckpt", lambda c: c.update({key: value}))
    line = refused(["fit", "--config", TINY, "--ckpt_path", str(checkpoint)], capsys)
    assert f"{key} = {value!r}: must be a whole number >= 0" in line


def test_export_is_atomic_a_failure_leaves_nothing_and_the_retry_succeeds(
    honest, tmp_path, monkeypatch
):
    out = tmp_path / "exported"
    real = export_lib.load_tokenizer

    def full_disk(name):
        class Tokenizer:
            def save_pretrained(self, folder):
                (Path(folder) / "tokenizer.json").write_text("{")
                raise OSError(28, "No space left on device")

        return Tokenizer()

    monkeypatch.setattr(export_lib, "load_tokenizer", full_disk)
    with pytest.raises(UserInputError, match=r"No space left on device.*nothing was left there"):
        export(honest, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(export_lib, "load_tokenizer", real)
    export(honest, out)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["exported"]


def test_a_checkpoint_without_a_checksum_is_refused(honest, tmp_path, capsys):
    full = torch.load(honest, weights_only=True)
    full.pop("vpd_checksum")
    torch.save(full, tmp_path / "old.ckpt")
    line = refused(["export", str(tmp_path / "old.ckpt"), str(tmp_path / "out")], capsys)
    assert "carries no checksum" in line


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_seal_adopts_a_checkpoint_without_a_checksum_once_and_only_that(
    honest, tmp_path, capsys, monkeypatch
):
    full = torch.load(honest, weights_only=True)
    full.pop("vpd_checksum")
    old = tmp_path / "old.ckpt"
    torch.save(full, old)
    assert "`python -m vpd_lightning seal`" in refused(
        ["predict", "--config", TINY, "--ckpt_path", str(old)], capsys
    )  # the refusal names the way out
    unsealed = old.read_bytes()
    with monkeypatch.context() as patch:  # a full disk: the checkpoint is left as it was
        patch.setattr(os, "fsync", no_space)
        assert "cannot be rewritten (disk full)" in refused(["seal", str(old)], capsys)
    assert old.read_bytes() == unsealed and [p.name for p in tmp_path.iterdir()] == ["old.ckpt"]
    main(["seal", str(old)])
    assert capsys.readouterr().out.strip().endswith("sealed (added vpd_checksum)")
    assert torch.load(old, weights_only=True)["vpd_checksum"] == content_digest(full)
    link = tmp_path / "last.ckpt"  # a link to a sealed file: the file is sealed, the link stays
    torch.save(full, tmp_path / "other.ckpt")
    link.symlink_to(tmp_path / "other.ckpt")
    main(["seal", str(link)])
    assert link.is_symlink() and "vpd_checksum" in torch.load(link, weights_only=True)
    link.unlink()
    (tmp_path / "other.ckpt").unlink()
    capsys.readouterr()
    main(["seal", str(old)])  # sealed already: verified, not rewritten
    assert "already sealed; its checksum matches" in capsys.readouterr().out
    out = export(old, tmp_path / "exported")
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "old.ckpt"]  # no temps


def test_seal_does_not_hide_corruption_or_read_past_the_load_bounds(honest, tmp_path, capsys):
    flipped = flip_embedding(honest, tmp_path / "flipped.ckpt")
    before = flipped.read_bytes()
    assert "does not match its checksum" in refused(["seal", str(flipped)], capsys)
    assert flipped.read_bytes() == before
    marker = tmp_path / "payload-ran"
    crafted = tmp_path / "crafted.ckpt"
    torch.save({"vpd_state": {}, "state_dict": {}, "x": Payload(marker)}, crafted)
    assert "crafted.ckpt" in refused(["seal", str(crafted)], capsys)
    assert not marker.exists(), "sealing ran the checkpoint's code"
    bomb = deflated_copy(honest, tmp_path / "bomb.ckpt", padding_mib=4)
    assert "bomb.ckpt" in refused(["seal", str(bomb)], capsys)


def test_seal_writes_a_trusted_folder_s_manifest_and_refuses_a_crafted_one(
    honest, tmp_path, capsys
):
    folder = sharded(honest, tmp_path / "old")
    (folder / "checksums.json").unlink()
    dead = 2**22 + 17  # above Linux's largest pid: no such process
    stale = temp_path(folder / "checksums.json").name.rsplit("-", 1)[0] + f"-{dead}"
    (folder / stale).write_text("{")  # a seal killed while writing
    main(["seal", str(folder)])
    assert "sealed (wrote checksums.json)" in capsys.readouterr().out
    verify_folder(folder)
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == [".metadata"]
    marker = tmp_path / "payload-ran"
    crafted = sharded(honest, tmp_path / "crafted")
    (crafted / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    (crafted / "checksums.json").unlink()
    assert "is not plain DCP metadata" in refused(["seal", str(crafted)], capsys)
    assert not marker.exists() and not (crafted / "checksums.json").exists()


def test_a_written_sharded_manifest_lists_every_file(honest, tmp_path):
    folder = sharded(honest, tmp_path / "s")
    listed = json.loads((folder / "checksums.json").read_text())["sha256"]
    assert set(listed) == {p.name for p in folder.iterdir()} - {"checksums.json"}
    meta = folder / "meta.pt"
    assert listed["meta.pt"] == hashlib.sha256(meta.read_bytes()).hexdigest()
