"""compat.trl.generalized_jsd_loss against TRL's own GKDTrainer.generalized_jsd_loss.

TRL's function is read from the installed package's source and executed alone: importing its
trainer module pulls in transformers' Trainer and datasets, which this test does not need.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vpd_kernels.compat.trl import generalized_jsd_loss

from .helpers import BACKENDS, assert_rel_close, loss_and_grad, make_logits, max_rel_err

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def load_trl_loss():
    spec = importlib.util.find_spec("trl")
    assert spec is not None, "trl is a dev dependency: pip install -e '.[dev]'"
    assert importlib.metadata.version("trl").startswith("1.16"), "tested against TRL 1.16"
    path = Path(spec.origin).parent / "experimental" / "gkd" / "gkd_trainer.py"
    trainer = next(
        node
        for node in ast.parse(path.read_text()).body
        if isinstance(node, ast.ClassDef) and node.name == "GKDTrainer"
    )
    function = next(
        node
        for node in trainer.body
        if isinstance(node, ast.FunctionDef) and node.name == "generalized_jsd_loss"
    )
    function.decorator_list = []
    namespace = {"torch": torch, "F": F}
    exec(compile(ast.Module([function], []), str(path), "exec"), namespace)
    return namespace["generalized_jsd_loss"]


trl_loss = load_trl_loss()


def inputs(dtype=torch.float32):
    """TRL's call site: logits (B, T, V) sliced [:, :-1] (not contiguous), labels with -100."""
    student, teacher, _ = make_logits(2, 6, 37, seed=40, scale=3.0)
    labels = torch.randint(0, 37, (2, 5), generator=torch.Generator().manual_seed(41))
    labels[0, :2] = -100
    return student.to(dtype), teacher.to(dtype)[:, :-1], labels


def compare(backend, labels, beta, temperature, reduction, num_items=None, dtype=torch.float32):
    student, teacher, all_labels = inputs(dtype)
    labels = all_labels if labels else None
    kw = {"labels": labels, "beta": beta, "temperature": temperature, "reduction": reduction}
    kw["num_items_in_batch"] = num_items
    ours, ours_grad = loss_and_grad(
        lambda x: generalized_jsd_loss(x[:, :-1], teacher, backend=backend, **kw), student
    )
    theirs, theirs_grad = loss_and_grad(lambda x: trl_loss(x[:, :-1], teacher, **kw), student)
    if reduction == "none" and num_items is None:
        theirs = theirs.sum(-1)  # TRL: per vocabulary entry; here per token
    return ours, ours_grad, theirs, theirs_grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_same_values_and_gradients_as_trl(backend, beta, reduction):
    for labels in (True, False):
        ours, grad, theirs, their_grad = compare(backend, labels, beta, 0.7, reduction)
        assert ours.shape == theirs.shape
        assert_rel_close(ours, theirs.double(), rtol=3e-6)
        assert_rel_close(grad, their_grad.double(), rtol=3e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_items_in_batch(backend):
    for num_items in (7, torch.tensor(9)):
        ours, grad, theirs, their_grad = compare(backend, True, 0.5, 1.0, "none", num_items)
        assert_rel_close(ours, theirs.double(), rtol=3e-6)
        assert_rel_close(grad, their_grad.double(), rtol=3e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_no_worse_than_trl(backend):
    """TRL computes in the logits' dtype, here in float32: compare both to float64."""
    ours, grad, theirs, their_grad = compare(
        backend, True, 0.5, 1.0, "batchmean", None, torch.bfloat16
    )
    exact, exact_grad = loss_and_grad(
        lambda x: trl_loss(x[:, :-1], inputs(torch.bfloat16)[1].double(), inputs()[2]),
        inputs(torch.bfloat16)[0].double(),
    )
    assert max_rel_err(ours, exact) <= max_rel_err(theirs, exact)
    assert max_rel_err(grad, exact_grad) <= max_rel_err(their_grad, exact_grad) + 1e-3
