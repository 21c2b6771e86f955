"""Sequence packing, weight snapshots and the resumable prompt order."""

import pytest
import torch

from vpd_lightning.policy.packing import pack, per_sequence_sum
from vpd_lightning.policy.snapshots import WeightSnapshot
from vpd_lightning.trainer.data import PromptSampler


def test_pack_aligns_student_and_teacher_completion_positions():
    completions = [[7, 8, 9], [5]]
    student = pack([[1, 2], [1, 2, 3, 4]], completions, pad_id=0)
    teacher = pack([[1, 2, 3, 3, 3], [6]], completions, pad_id=0)
    for batch in (student, teacher):
        assert batch.targets.tolist() == [7, 8, 9, 5]
        # the token at (row, col + 1) is the target: the hidden state at col predicts it
        assert batch.input_ids[batch.rows, batch.cols + 1].tolist() == [7, 8, 9, 5]
    assert student.attention_mask.sum().item() == 5 + 5
    sums = per_sequence_sum(torch.tensor([1.0, 2.0, 3.0, 4.0]), student)
    assert sums.tolist() == [6.0, 4.0]
    with pytest.raises(ValueError, match="at least one token"):
        pack([[]], [[1]], pad_id=0)


def test_snapshot_swaps_in_and_restores_exactly():
    layer = torch.nn.Linear(3, 2)
    snapshot = WeightSnapshot(layer, ["weight", "bias"])
    initial = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(1.0)
    live = layer.weight.detach().clone()
    with snapshot.swapped_in():
        assert torch.equal(layer.weight, initial)
    assert torch.equal(layer.weight, live)
    snapshot.ema_update(0.25)
    torch.testing.assert_close(snapshot.values["weight"], initial + 0.25)


def test_prompt_sampler_is_a_pure_function_of_step_and_rank():
    records = [{"i": i} for i in range(10)]
    sampler = PromptSampler(records, per_rank=3, seed=1)
    again = PromptSampler(records, per_rank=3, seed=1)
    seen = [r["i"] for step in range(3) for rank in range(2) for r in sampler.batch(step, rank, 2)]
    assert seen[:10] and sorted(seen[:9]) == sorted(set(seen[:9]))  # no repeats within an epoch
    assert sampler.batch(5, 1, 2) == again.batch(5, 1, 2)
    assert sampler.batch(0, 0, 2) != sampler.batch(0, 1, 2)
    with pytest.raises(ValueError, match="empty"):
        PromptSampler([], 1, 0)


def test_plot_draws_the_logged_curves_and_explains_a_wrong_folder(tmp_path):
    from vpd_lightning.run.plot import plot_run, read_series

    (tmp_path / "metrics.csv").write_text(
        "epoch,step,train/reward_mean,estep/loss,val/mean@1\n"
        "0,0,,,0.25\n0,1,0.5,,\n0,2,0.75,1.2,\n0,2,,,0.5\n"
    )
    series = read_series(tmp_path / "metrics.csv")
    assert series["train/reward_mean"] == [(1, 0.5), (2, 0.75)]
    assert series["estep/loss"] == [(2, 1.2)]
    assert plot_run(tmp_path).stat().st_size > 10_000
    with pytest.raises(FileNotFoundError, match="CSVLogger"):
        plot_run(tmp_path / "nowhere")
