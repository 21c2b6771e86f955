"""Several processes: DDP and FSDP2 on two CPU processes over gloo train exactly as one process on
the same global batch, the CLI runs end to end with both, sharded checkpoints resume and export,
and strategies that cannot work are refused up front."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
from transformers import AutoModelForCausalLM, AutoTokenizer

from vpd_lightning.cli import main
from vpd_lightning.errors import UserInputError
from vpd_lightning.export import export
from vpd_lightning.run.checks import check_checkpoint_strategy
from vpd_lightning.trainer.distributed import end_process_group
from vpd_lightning.trainer.strategies import FSDP2Strategy, check_strategy

from .ddp_run import CASES, run_case
from .helpers import tiny_module, tiny_trainer

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
# Float32 sums in another order: metrics agree to this relative tolerance, or this absolute one
# for the near-zero KLs of a random model.
REL, ABS = 2e-3, 1e-6


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=300, env=ENV, cwd=cwd
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one-process")
    for case in CASES:
        run_case(out, case)
    return out


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Callable[[str], Path]:
    """`ddp_run.py` on two processes with a strategy, launched once per module and strategy."""
    outputs: dict[str, Path] = {}

    def launched(strategy: str) -> Path:
        if strategy not in outputs:
            out = tmp_path_factory.mktemp(strategy)
            run([str(ROOT / "tests/trainer/ddp_run.py"), str(out), strategy], cwd=out)
            outputs[strategy] = out
        return outputs[strategy]

    return launched


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_train_as_one_process_on_the_same_global_batch(
    one_process, two_processes, strategy, case
):
    two = two_processes(strategy)
    ref = json.loads((one_process / f"{case}.json").read_text())
    got = json.loads((two / f"{case}.json").read_text())
    assert got["global_step"] == ref["global_step"] == 2
    assert got["sharded"] == (strategy == "fsdp2")
    # the same prompts: rank 0's then rank 1's at each step, none shared between ranks
    rank0, rank1 = got["prompts"]
    assert not set(rank0) & set(rank1)
    assert [p for i in range(2) for p in rank0[2 * i : 2 * i + 2] + rank1[2 * i : 2 * i + 2]] == (
        ref["prompts"][0]
    )
    # losses, their parts, delta, beta, and the train metrics over both processes' rollouts
    for ref_row, got_row in zip(ref["steps"], got["steps"], strict=True):
        assert ref_row.keys() == got_row.keys()
        for key, value in ref_row.items():
            if not key.startswith(("time/", "throughput/")):
                assert got_row[key] == pytest.approx(value, rel=REL, abs=ABS), (strategy, key)
    assert got["delta"] == pytest.approx(ref["delta"], rel=REL, abs=ABS)
    assert got["beta"] == pytest.approx(ref["beta"], rel=1e-9)
    # the weight update, relative to its size
    ref_weights = torch.load(one_process / f"{case}.pt")
    got_weights = torch.load(two / f"{case}.pt")
    initial = torch.load(one_process / f"{case}-initial.pt")
    updates = {k: ref_weights[k] - initial[k] for k in initial}
    scale = max(float(u.abs().max()) for u in updates.values())
    assert scale > 0
    for name, update in updates.items():
        torch.testing.assert_close(
            got_weights[name] - initial[name], update, rtol=0, atol=1e-3 * scale, msg=name
        )


@pytest.mark.slow
def test_fsdp2_resume_from_a_sharded_checkpoint_equals_the_straight_run(two_processes):
    out = two_processes("fsdp2")
    checkpoint = out / "vpd-shared-step1.ckpt"
    assert (checkpoint / "meta.pt").is_file() and len(list(checkpoint.glob("*.distcp"))) == 2
    straight = torch.load(out / "vpd-shared.pt")
    resumed = torch.load(out / "vpd-shared-resumed.pt")
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name


@pytest.mark.slow
def test_export_of_a_sharded_checkpoint_loads_in_transformers_with_the_trained_logits(
    two_processes, tmp_path
):
    out = two_processes("fsdp2")
    folder = export(out / "vpd-shared-step1.ckpt", tmp_path / "hf")
    trained = torch.load(out / "vpd-shared-step1-logits.pt")
    model = AutoModelForCausalLM.from_pretrained(folder)
    AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        logits = model(input_ids=trained["input_ids"]).logits
    torch.testing.assert_close(logits, trained["logits"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_cli_fit_then_evaluate_on_two_cpu_processes(tmp_path, strategy):
    """`fit` exits 0 with one summary, one metrics file and one checkpoint; the checkpoint then
    evaluates on two processes (ddp: validate, fsdp2: test); a DDP checkpoint exports (the
    sharded one's export is checked against the trained logits above)."""
    common = ["--config", str(ROOT / "configs/tiny.yaml"), "--trainer.accelerator", "cpu"]
    common += ["--trainer.devices", "2", "--trainer.strategy", strategy]
    fit = run(
        ["-m", "vpd_lightning", "fit", *common, "--trainer.max_steps", "2"]
        + ["--trainer.enable_progress_bar", "false"],
        cwd=tmp_path,
    )
    assert fit.stdout.count("training finished") == 1
    runs = tmp_path / "runs/tiny"
    assert [p.name for p in runs.iterdir()] == ["version_0"]
    assert [p.name for p in (runs / "version_0/checkpoints").iterdir()] == ["last.ckpt"]
    checkpoint = runs / "version_0/checkpoints/last.ckpt"
    assert checkpoint.is_dir() == (strategy == "fsdp2")
    rows = list(csv.DictReader((runs / "version_0/metrics.csv").open()))
    assert [r["step"] for r in rows if r.get("train/reward_mean")] == ["1", "2"]

    subcommand = "validate" if strategy == "ddp" else "test"
    evaluated = run(
        ["-m", "vpd_lightning", subcommand, *common, "--ckpt_path", str(checkpoint)], cwd=tmp_path
    )
    assert f"{'val' if subcommand == 'validate' else 'test'}/mean@2" in evaluated.stdout

    if strategy == "ddp":
        exported = run(["-m", "vpd_lightning", "export", str(checkpoint), "hf"], cwd=tmp_path)
        assert "exported the model" in exported.stdout
        assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf").config.num_hidden_layers == 2


def one_process_group(tmp_path: Path) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )


def test_end_process_group_destroys_the_group_and_is_a_no_op_without_one(tmp_path):
    """Gloo's threads otherwise outlive the interpreter: about 1 two-process exit in 6 aborted
    (SIGABRT) on this machine without it, 0 in 40 with it."""
    end_process_group()  # no group: nothing to do
    one_process_group(tmp_path)
    end_process_group()
    assert not torch.distributed.is_initialized()


def test_the_cli_ends_the_process_group_after_a_finished_fit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_process_group(tmp_path)
    try:
        main(
            ["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--trainer.max_steps", "1"]
            + ["--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0"]
        )
        assert not torch.distributed.is_initialized()
    finally:
        end_process_group()


@pytest.mark.parametrize(
    "strategy",
    [FSDPStrategy(), type("DeepSpeedStrategy", (), {})(), ModelParallelStrategy()],
    ids=["fsdp1", "deepspeed", "tensor-parallel"],
)
def test_strategies_that_cannot_work_are_refused_with_the_reason(strategy):
    with pytest.raises(UserInputError, match=r"trainer\.strategy.*(ddp|fsdp2)"):
        check_strategy(strategy)


def test_ddp_and_fsdp2_are_accepted():
    check_strategy(DDPStrategy())
    check_strategy(FSDP2Strategy())


def test_a_sharded_checkpoint_needs_fsdp2_and_a_file_loads_anywhere(tmp_path):
    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    for strategy in ("fsdp2", FSDP2Strategy()):
        check_checkpoint_strategy(folder, strategy)
    with pytest.raises(UserInputError, match=r"sharded \(fsdp2\).*'ddp'.*export"):
        check_checkpoint_strategy(folder, "ddp")
    (tmp_path / "file.ckpt").write_bytes(b"x")
    check_checkpoint_strategy(tmp_path / "file.ckpt", "ddp")


def test_resuming_with_another_number_of_processes_is_refused(tmp_path):
    """Each process's prompts and E-step buffer depend on the world size."""
    from lightning.pytorch.trainer.states import TrainerFn

    module = tiny_module()
    module.trainer = tiny_trainer(tmp_path, 1)
    module.trainer.state.fn = TrainerFn.FITTING
    rank_state = {"estep_buffer": [], "rng": None}
    state = {"per_rank": [rank_state, rank_state], "estep": None, "nonfinite": {}}
    with pytest.raises(UserInputError, match=r"written by 2 process.*resumed with 1"):
        module.on_load_checkpoint({"vpd_state": state})
