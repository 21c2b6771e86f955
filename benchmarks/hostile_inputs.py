"""Hostile inputs through `python -m vpd_lightning`, each in a subprocess under a memory limit.

    python benchmarks/hostile_inputs.py --checkout . --out results.json [--only NAME ...]

For each case: the exit status, whether it ended in one error line (exit 2) or a traceback, the
wall time, the child's peak RSS, and whether a crafted checkpoint ran its payload (a marker file
appears). Every child runs under RLIMIT_AS (`--limit-gb`, 2 by default) and a timeout, so a case
that would take the machine's memory fails instead. Cases are built for the checkout under test
from a checkpoint that checkout writes (`fit` of configs/tiny.yaml, one step), so that a crafted
checkpoint differs from an honest one of that version only in what the case changes; where the
checkout seals checkpoints with a checksum, the crafted one is resealed (an adversary can).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch
import yaml

MARKER = "PAYLOAD_RAN"
LAUNCHER = """
import resource, subprocess, sys, json, time
limit = int(sys.argv[1]); timeout = float(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
start = time.monotonic()
try:
    done = subprocess.run(sys.argv[3:], capture_output=True, text=True, timeout=timeout)
    code, err = done.returncode, done.stderr
except subprocess.TimeoutExpired as e:
    code, err = "timeout", (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
seconds = time.monotonic() - start
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"code": code, "seconds": seconds, "peak_mb": peak / 1024, "stderr": err[-3000:]}))
"""


class Payload:
    """Pickles to a call that writes the marker file: what a crafted checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def tiny_config(work: Path, checkout: Path, **changes) -> Path:
    config = yaml.safe_load((checkout / "configs/tiny.yaml").read_text())
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(work / "runs")
    config["trainer"]["max_steps"] = 1
    for dotted, value in changes.items():
        node = config
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[key]
        node[last] = value
    path = work / f"tiny-{hashlib.sha1(repr(changes).encode()).hexdigest()[:8]}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def honest_checkpoint(work: Path, checkout: Path, python: str) -> Path:
    config = tiny_config(work, checkout)
    run = [python, "-m", "vpd_lightning", "fit", "--config", str(config)]
    run += ["--evaluate_before_after", "false", "--trainer.logger.init_args.name", "honest"]
    subprocess.run(run, cwd=work, env=child_env(checkout), check=True, capture_output=True)
    return work / "runs/honest/version_0/checkpoints/last.ckpt"


def child_env(checkout: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(checkout), "PYTHONDONTWRITEBYTECODE": "1"}


def reseal(checkpoint: dict, checkout: Path, python: str, path: Path) -> None:
    """Save `checkpoint` to `path`, with a fresh checksum where the checkout writes one."""
    torch.save(checkpoint, path)
    code = (
        "import sys, torch\n"
        "try:\n    from vpd_lightning.trainer.checkpoint_files import seal\n"
        "except ImportError:\n    sys.exit(0)\n"
        "c = torch.load(sys.argv[1], weights_only=True); seal(c); torch.save(c, sys.argv[1])\n"
    )
    subprocess.run([python, "-c", code, str(path)], env=child_env(checkout), check=True)


def manifest(folder: Path) -> None:
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.name != "checksums.json")
    sums = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    (folder / "checksums.json").write_text(json.dumps({"sha256": sums}))


def rce_folder(work: Path, honest: Path, marker: Path, via_item: bool) -> Path:
    """A sharded folder whose meta.pt is honest and whose `.metadata` (or a non-tensor item
    under `state_dict`) runs `Payload` when unpickled; with a valid checksums.json."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    folder = work / ("rce-item" if via_item else "rce-metadata")
    full = torch.load(honest, weights_only=True)
    state = {"state_dict": dict(full["state_dict"])}
    if via_item:
        state["state_dict"]["policy.model.extra"] = Payload(marker)
    dcp.save(state, storage_writer=FileSystemWriter(folder), no_dist=True)
    meta = {k: v for k, v in full.items() if k not in ("state_dict", "optimizer_states")}
    torch.save(meta, folder / "meta.pt")
    if not via_item:
        (folder / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    manifest(folder)
    return folder


def zip_bomb(work: Path, honest: Path, gib: float) -> Path:
    """The honest checkpoint plus a `gib` GiB tensor of zeros, its member deflated (~1000x);
    not resealed (resealing would read the 3 GiB: the zip directory refuses it first anyway)."""
    full = torch.load(honest, weights_only=True)
    numel = int(gib * 2**30)
    sparse = work / "zeros.bin"
    with open(sparse, "wb") as handle:
        handle.truncate(numel)
    full["padding"] = torch.from_file(str(sparse), shared=True, size=numel, dtype=torch.uint8)
    stored = work / "stored.ckpt"
    torch.save(full, stored)
    del full
    bomb = work / "bomb.ckpt"
    with zipfile.ZipFile(stored) as source, zipfile.ZipFile(bomb, "w") as target:
        for info in source.infolist():
            out = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            out.compress_type = zipfile.ZIP_DEFLATED
            with source.open(info) as reader, target.open(out, "w", force_zip64=True) as writer:
                while chunk := reader.read(2**24):
                    writer.write(chunk)
    stored.unlink()
    sparse.unlink()
    return bomb


def many_members(work: Path, count: int) -> Path:
    path = work / "members.ckpt"
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(count):
            archive.writestr(f"archive/data/{i}", b"")
    return path


def edited(work: Path, honest: Path, checkout: Path, python: str, name: str, edit) -> Path:
    full = torch.load(honest, weights_only=True)
    edit(full)
    path = work / f"{name}.ckpt"
    reseal(full, checkout, python, path)
    return path


def flipped(work: Path, honest: Path) -> Path:
    """The honest checkpoint with bytes of the embedding's storage set to float32 3e4."""
    full = torch.load(honest, weights_only=True, mmap=True)
    key = next(k for k in full["state_dict"] if "embed" in k)
    target = full["state_dict"][key]
    pattern = target.reshape(-1)[:4].numpy().tobytes()
    data = bytearray(honest.read_bytes())
    at = data.find(pattern)
    assert at >= 0, "embedding bytes not found"
    data[at : at + 4] = torch.tensor([3e4]).numpy().tobytes()
    path = work / "flipped.ckpt"
    path.write_bytes(bytes(data))
    return path


def build_cases(work: Path, checkout: Path, python: str) -> list[dict]:
    honest = honest_checkpoint(work, checkout, python)
    marker = work / MARKER
    tiny = str(tiny_config(work, checkout))
    fit = ["fit", "--config", tiny, "--evaluate_before_after", "false"]
    cases: list[dict] = []

    def case(name, argv, timeout=120, cls="", **extra):
        cases.append({"name": name, "argv": argv, "timeout": timeout, "class": cls, **extra})

    laughs = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for level in range(1, 9):
        prev = chr(ord("a") + level - 1)
        laughs.append(
            f"{chr(ord('a') + level)}: &{chr(ord('a') + level)} [{', '.join([f'*{prev}'] * 9)}]"
        )
    bomb_yaml = work / "laughs.yaml"
    bomb_yaml.write_text("\n".join(laughs) + "\n")
    case(
        f"yaml: billion laughs ({bomb_yaml.stat().st_size} B) as a 2nd --config",
        [*fit, "--config", str(bomb_yaml)],
        cls="severe 6",
    )
    comments = work / "comments.yaml"
    with open(comments, "w") as handle:
        line = "# " + "x" * 97 + "\n"
        for _ in range(10**6):
            handle.write(line)
    case(
        "yaml: 100 MB of comments as --config",
        [*fit, "--config", str(comments)],
        timeout=200,
        cls="severe 6",
    )
    value = (
        "{"
        + "a0: &a0 [l,l,l,l,l,l,l,l,l], "
        + ", ".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9))
        + "}"
    )
    case(
        "yaml: billion laughs as a command-line value",
        [*fit, "--data.task.init_args", value],
        cls="severe 6",
    )
    rec = work / "recursive.yaml"
    rec.write_text("seed_everything: &a [*a]\n")
    case("yaml: recursive anchor", [*fit, "--config", str(rec)], cls="severe 6")

    for via_item in (False, True):
        folder = rce_folder(work, honest, marker, via_item)
        what = "a non-tensor item" if via_item else ".metadata"
        case(
            f"ckpt: sharded folder, {what} runs code: export",
            ["export", str(folder), str(work / f"export-{via_item}")],
            cls="severe 1",
        )
        case(
            f"ckpt: sharded folder, {what} runs code: predict",
            [
                "predict",
                "--config",
                tiny,
                "--ckpt_path",
                str(folder),
                "--sample.limit",
                "1",
                "--sample.out",
                str(work / "p.jsonl"),
            ],
            cls="severe 1",
        )
        case(
            f"ckpt: sharded folder, {what} runs code: fit fsdp2",
            [
                *fit,
                "--ckpt_path",
                str(folder),
                "--trainer.strategy",
                "fsdp2",
                "--trainer.max_steps",
                "2",
            ],
            cls="severe 1",
        )
    bomb = zip_bomb(work, honest, gib=3.0)
    case(
        f"ckpt: zip bomb ({bomb.stat().st_size / 2**20:.1f} MB -> 3 GiB): fit --ckpt_path",
        [*fit, "--ckpt_path", str(bomb), "--trainer.max_steps", "2"],
        cls="severe 6",
    )
    case("ckpt: zip bomb: export", ["export", str(bomb), str(work / "export-bomb")], cls="severe 6")
    members = many_members(work, 300_000)
    case(
        f"ckpt: zip of 300k empty members ({members.stat().st_size / 2**20:.0f} MB): fit",
        [*fit, "--ckpt_path", str(members)],
        cls="severe 6",
    )
    flip = flipped(work, honest)
    case(
        "ckpt: 4 bytes of the embedding set to 3e4: fit --ckpt_path",
        [*fit, "--ckpt_path", str(flip), "--trainer.max_steps", "2"],
        cls="moderate checksum",
    )
    case(
        "ckpt: 4 bytes of the embedding set to 3e4: predict",
        [
            "predict",
            "--config",
            tiny,
            "--ckpt_path",
            str(flip),
            "--sample.limit",
            "1",
            "--sample.out",
            str(work / "p.jsonl"),
        ],
        cls="moderate checksum",
    )
    negative = edited(
        work, honest, checkout, python, "negative", lambda c: c.update(global_step=-5)
    )
    case(
        "ckpt: global_step -5 (resealed): fit",
        [*fit, "--ckpt_path", str(negative), "--trainer.max_steps", "2"],
        cls="moderate",
    )

    def reshape(c):
        key = next(k for k in c["state_dict"] if "embed" in k)
        c["state_dict"][key] = c["state_dict"][key][:-1].clone()

    def drop(c):
        c["state_dict"].pop(next(k for k in c["state_dict"] if "embed" in k))

    for name, edit in (("a weight of another shape", reshape), ("a missing weight", drop)):
        path = edited(work, honest, checkout, python, name.replace(" ", "-"), edit)
        case(
            f"ckpt: {name} (resealed): fit",
            [*fit, "--ckpt_path", str(path), "--trainer.max_steps", "2"],
            cls="moderate traceback",
        )
        case(
            f"ckpt: {name} (resealed): predict",
            [
                "predict",
                "--config",
                tiny,
                "--ckpt_path",
                str(path),
                "--sample.out",
                str(work / "p.jsonl"),
            ],
            cls="moderate traceback",
        )

    case("trainer.max_steps -1", [*fit, "--trainer.max_steps", "-1"], timeout=60, cls="moderate")
    versioned = [*fit, "--trainer.logger.init_args.version", "7"]
    case("logger version 7, first run", versioned, cls="moderate")
    case("logger version 7 again", versioned, cls="moderate")
    file = work / "a-file"
    file.write_text("x")
    for label, args in [
        ("trainer.val_check_interval 0", ["--trainer.val_check_interval", "0"]),
        ("trainer.precision 64", ["--trainer.precision", "64"]),
        ("trainer.devices 0", ["--trainer.devices", "0"]),
        ("trainer.devices -2", ["--trainer.devices", "-2"]),
        ("trainer.num_nodes 0", ["--trainer.num_nodes", "0"]),
        ("logger save_dir is a file", ["--trainer.logger.init_args.save_dir", str(file)]),
        (
            "default_root_dir is a file",
            ["--trainer.logger", "false", "--trainer.default_root_dir", str(file)],
        ),
        (
            "lora target_modules match nothing",
            ["--model.lora", "{r: 4, alpha: 8, target_modules: [nope]}"],
        ),
        ("lora r 0", ["--model.lora", "{r: 0, alpha: 8}"]),
        ("trainer.limit_val_batches -1", ["--trainer.limit_val_batches", "-1"]),
        ("trainer.log_every_n_steps 0", ["--trainer.log_every_n_steps", "0"]),
        ("trainer.max_time bad", ["--trainer.max_time", "soon"]),
        (
            "checkpoint every_n_train_steps -1",
            ["--trainer.callbacks.init_args.every_n_train_steps", "-1"],
        ),
        ("seed_everything -1", ["--seed_everything", "-1"]),
        ("trainer.accelerator gpu (none here)", ["--trainer.accelerator", "gpu"]),
        ("model.max_context_tokens 0", ["--model.max_context_tokens", "0"]),
    ]:
        case(label, [*fit, *args], cls="moderate traceback")
    predict = ["predict", "--config", tiny, "--sample.out", str(work / "p.jsonl")]
    outdir = work / "a-folder"
    outdir.mkdir()
    for label, args in [
        ("predict split the task lacks", ["--sample.split", "validation"]),
        ("predict batch_size 0", ["--sample.batch_size", "0"]),
        ("predict limit -1", ["--sample.limit", "-1"]),
        ("predict out is a folder", ["--sample.out", str(outdir)]),
    ]:
        case(label, [*predict, *args], cls="moderate traceback")
    jsonl = work / "tasks.jsonl"
    for label, record in [
        ("jsonl: a prompt that is a list of strings", {"prompt": ["2+2?"], "answer": "4"}),
        (
            "jsonl: an unknown chat role",
            {"prompt": [{"role": "wizard", "content": "2+2?"}], "answer": "4"},
        ),
    ]:
        path = work / f"{len(cases)}-{jsonl.name}"
        path.write_text("\n".join([json.dumps(record)] * 16) + "\n")
        case(
            label,
            [
                *fit,
                "--data.task",
                "vpd_lightning.tasks.JsonlTask",
                "--data.task.init_args.path",
                str(path),
            ],
            cls="moderate traceback",
        )
    return cases


def run_case(case: dict, python: str, checkout: Path, work: Path, limit: int) -> dict:
    marker = work / MARKER
    marker.unlink(missing_ok=True)
    command = [
        sys.executable,
        "-c",
        LAUNCHER,
        str(limit),
        str(case["timeout"]),
        python,
        "-m",
        "vpd_lightning",
        *case["argv"],
    ]
    done = subprocess.run(
        command, cwd=work, env=child_env(checkout), capture_output=True, text=True
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    err = result.pop("stderr")
    lines = [line for line in err.splitlines() if line.startswith("vpd_lightning: error:")]
    result.update(
        name=case["name"],
        cls=case["class"],
        payload_ran=marker.exists(),
        traceback="Traceback" in err,
        message=(lines[-1] if lines else err.strip().splitlines()[-1] if err.strip() else "")[:300],
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkout", type=Path, default=Path("."))
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--limit-gb", type=float, default=2.0)
    parser.add_argument("--only", nargs="*", default=None)
    options = parser.parse_args()
    checkout = options.checkout.resolve()
    with tempfile.TemporaryDirectory(prefix="hostile-") as folder:
        work = Path(folder)
        cases = build_cases(work, checkout, options.python)
        results = []
        for case in cases:
            if options.only and not any(o in case["name"] for o in options.only):
                continue
            result = run_case(case, options.python, checkout, work, int(options.limit_gb * 2**30))
            print(json.dumps(result), flush=True)
            results.append(result)
    options.out.write_text(json.dumps({"uptime": os.getloadavg(), "results": results}, indent=1))


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
    started = time.monotonic()
    main()
    print(f"done in {time.monotonic() - started:.0f} s", file=sys.stderr)
