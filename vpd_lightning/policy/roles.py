"""The policy network and the weights each role sees: student, trainable teacher, passive teacher.

One network serves every role. What differs is which weights are live when it runs:
- the student: the trainable weights (all of them, or the `student` LoRA adapter);
- the VPD teacher: the same weights (`shared`) or the `teacher` LoRA adapter (`adapter`);
- the SDPO/OPSD teacher: the live weights, an EMA snapshot, the initial snapshot, or a logit
  interpolation of initial and current (computed as one wider matmul, see `teacher_features`).

Every computation with the network runs as this module's forward, through `run` (or `generate`). That is a
plain call without sharding; under FSDP2 (`shard`) the policy is the root unit, and its hooks
gather the weights no decoder layer owns (embeddings, final norm, lm_head, which the fused losses
read directly rather than through the head's forward) and reduce-scatter their gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch.distributed.device_mesh import DeviceMesh

from vpd_lightning.errors import UserInputError
from vpd_lightning.options import LoraOptions
from vpd_lightning.policy.models import (
    STUDENT_ADAPTER,
    TEACHER_ADAPTER,
    adapter_parameters,
    add_lora,
    decoder_and_head,
    head_transform,
)
from vpd_lightning.policy.packing import PackedBatch, completion_hidden
from vpd_lightning.policy.snapshots import WeightSnapshot

T = TypeVar("T")


@dataclass(frozen=True)
class TeacherWeights:
    """The weights a teacher that is not trained runs with, as the methods table says
    (`MethodSpec.teacher_weights`): the live weights (the default), or a snapshot of the initial
    student that stays fixed, follows the student as an EMA (`ema_decay`), or is mixed with the
    live weights' logits as `interpolation x initial + (1 - interpolation) x current`."""

    snapshot: bool = False
    ema_decay: float | None = None
    interpolation: float | None = None


class Policy(torch.nn.Module):
    """A causal LM plus the bookkeeping of which weights play student and teacher."""

    def __init__(
        self,
        model: torch.nn.Module,
        lora: LoraOptions | None,
        separate_teacher_adapter: bool,
        teacher_weights: TeacherWeights,
        initial_prior: bool = False,
    ) -> None:
        super().__init__()
        if separate_teacher_adapter and lora is None:
            raise ValueError("teacher_mode: adapter needs LoRA; set model.lora (e.g. {r: 16}).")
        self.separate_teacher_adapter = separate_teacher_adapter
        if lora is not None:
            adapters = (
                (STUDENT_ADAPTER, TEACHER_ADAPTER)
                if separate_teacher_adapter
                else (STUDENT_ADAPTER,)
            )
            model = add_lora(model, lora, adapters)
            if (
                separate_teacher_adapter
            ):  # both adapters start equal: the teacher begins as the student
                with torch.no_grad():
                    for s, t in zip(
                        adapter_parameters(model, STUDENT_ADAPTER),
                        adapter_parameters(model, TEACHER_ADAPTER),
                        strict=True,
                    ):
                        t.copy_(s)
        self.model = model
        self.uses_lora = lora is not None
        self.teacher_weights = teacher_weights
        self.initial_prior = initial_prior  # the E-step anchors to the initial snapshot
        self.snapshot: WeightSnapshot | None = None
        if initial_prior or teacher_weights.snapshot:
            self.snapshot = self._take_snapshot()
        self.sharded_units: list[torch.nn.Module] = []  # FSDP2 units besides the root
        self._enable_all_trainable()

    def _take_snapshot(self) -> WeightSnapshot:
        return WeightSnapshot(self.model, (n for n, _ in self._student_named_parameters()))

    # ----------------------------------------------------------------------------- running
    def run(self, compute: Callable[..., T], /, *args, **kwargs) -> T:
        """`compute(self, *args, **kwargs)`, a pass with this network (a loss, features), run as
        this module's forward, so that under FSDP2 the root unit's hooks gather the weights no
        decoder layer owns before it and reduce their gradients after (see the module docstring).
        Every pass outside `generate` goes through here."""
        return self(compute, args, kwargs)

    def forward(self, compute: Callable[..., T], args: tuple, kwargs: dict) -> T:
        """The body of `run` (called through `__call__` so that module hooks apply)."""
        return compute(self, *args, **kwargs)

    @torch.no_grad()
    def generate(self, **kwargs) -> torch.Tensor:
        """`generate` of the network. Under FSDP2 every layer is gathered once for the whole call
        (registered as a forward of the root in `shard`): no collective per generated token, and
        processes whose responses end sooner need not wait for the others."""
        if not self.sharded_units:
            return self.model.generate(**kwargs)
        for unit in self.sharded_units:
            unit.unshard()
            unit.set_reshard_after_forward(False)
        try:
            return self.model.generate(**kwargs)
        finally:
            for unit in self.sharded_units:
                unit.set_reshard_after_forward(True)
                unit.reshard()

    def shard(self, mesh: DeviceMesh) -> None:
        """FSDP2: one unit per decoder layer, and the policy itself the root unit, which keeps
        the embeddings, final norm and lm_head (tied or not) together. Idempotent: Lightning
        calls `configure_model` again for each of fit, validate and test in one process."""
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        if self.sharded_units:
            return
        layers = getattr(decoder_and_head(self.model)[0], "layers", None)
        if not isinstance(layers, torch.nn.ModuleList):
            raise UserInputError(
                f"trainer.strategy = fsdp2: the model's decoder ({type(self.model).__name__}) "
                "has no `layers` list to shard one by one; use trainer.strategy: ddp"
            )
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)
        register_fsdp_forward_method(self, "generate")
        self.sharded_units = list(layers)
        if self.snapshot is not None:  # the parameters are now shards: so must the copies be
            self.snapshot = self._take_snapshot()

    # ----------------------------------------------------------------------------- parameters
    def _student_named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        if self.uses_lora:
            marker = f".{STUDENT_ADAPTER}."
            return (
                (n, p) for n, p in self.model.named_parameters() if marker in n and "lora_" in n
            )
        return iter(self.model.named_parameters())

    def student_parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self._student_named_parameters()]

    def teacher_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters the E-step trains: the teacher adapter, or the shared weights."""
        if self.separate_teacher_adapter:
            return adapter_parameters(self.model, TEACHER_ADAPTER)
        return self.student_parameters()

    def _enable_all_trainable(self) -> None:
        """PEFT's set_adapter freezes inactive adapters; keep every trained parameter trainable
        so that DDP, which registers parameters when it wraps the model, syncs both adapters."""
        for p in self.student_parameters():
            p.requires_grad_(True)
        if self.separate_teacher_adapter:
            for p in self.teacher_parameters():
                p.requires_grad_(True)

    # ----------------------------------------------------------------------------- roles
    @contextmanager
    def adapter(self, name: str) -> Iterator[None]:
        """Run with one LoRA adapter active, then restore the one that was active before, so
        roles nest (the E-step reads the student's prior inside the teacher's context).
        Only meaningful with a separate teacher adapter."""
        if not self.separate_teacher_adapter:
            yield
            return
        previous = self.model.active_adapter
        self.model.set_adapter(name)
        self._enable_all_trainable()
        try:
            yield
        finally:
            self.model.set_adapter(previous)
            self._enable_all_trainable()

    def student(self) -> contextmanager:
        return self.adapter(STUDENT_ADAPTER)

    def trainable_teacher(self) -> contextmanager:
        return self.adapter(TEACHER_ADAPTER) if self.separate_teacher_adapter else nullcontext()

    @contextmanager
    def distilled_teacher(self) -> Iterator[None]:
        """Run with the weights of the teacher the M-step distils from: the trained teacher, the
        live weights, or the passive teacher's snapshot (EMA, initial). For sampling from it (the
        teacher's held-out repair rate); an interpolated teacher mixes two networks' logits,
        which `generate` cannot sample from."""
        if self.teacher_weights.interpolation is not None:
            raise UserInputError(
                "model.validation.teacher = true with model.sdpo.teacher = interpolate: the "
                "interpolated teacher mixes two networks' logits and cannot be sampled from; use "
                "sdpo.teacher ema or current, or set model.validation.teacher: false"
            )
        if self.teacher_weights.snapshot:
            with self.student(), self.snapshot.swapped_in():
                yield
            return
        with self.trainable_teacher():
            yield

    @property
    def head_weight(self) -> torch.Tensor:
        return decoder_and_head(self.model)[1].weight

    @property
    def head_kwargs(self) -> dict:
        """The head's logit transform (Cohere's scale, Gemma 2/3's softcap) as the keywords of
        vpd_kernels' log-prob and distillation losses, for the one head every role shares."""
        return head_transform(self.model.config)

    @property
    def distill_head_kwargs(self) -> dict:
        """`head_kwargs` for student and teacher of a fused distillation loss (one network)."""
        kw = self.head_kwargs
        return {**kw, **{f"teacher_{key}": value for key, value in kw.items()}}

    def kept_head_weight(self) -> torch.Tensor:
        """The head's current values, safe to keep after this pass: a copy when the head is
        trained (it will change) or gathered by FSDP2 (freed when the pass ends)."""
        head = self.head_weight
        keep = head.requires_grad or bool(self.sharded_units)
        return head.detach().clone() if keep else head.detach()

    def hidden(self, batch: PackedBatch) -> torch.Tensor:
        """Final hidden states at the completion positions of `batch` with the live weights."""
        return completion_hidden(decoder_and_head(self.model)[0], batch)

    def _head_is_swapped(self) -> bool:
        return self.snapshot is not None and any(
            p is self.head_weight for p in self.snapshot.params.values()
        )

    @torch.no_grad()
    def prior_features(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden, weight) of the E-step's prior without the feedback context: the current
        student (dynamic prior), or the initial student snapshot (fixed prior)."""
        with self.student():
            if not self.initial_prior:
                return self.hidden(batch), self.head_weight
            with self.snapshot.swapped_in():
                hidden = self.hidden(batch)
                weight = self.head_weight.detach().clone() if self._head_is_swapped() else None
            return hidden, self.head_weight if weight is None else weight

    @torch.no_grad()
    def teacher_features(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden, weight) whose product is the teacher's logits; weight None: the live head.

        A swapped-in snapshot may hold its own lm_head weight (full fine-tuning), so the weight is
        copied out before the live weights come back.
        """
        head_is_swapped = self._head_is_swapped()
        weights = self.teacher_weights
        if not weights.snapshot:
            with self.trainable_teacher():
                return self.hidden(batch), None
        if weights.interpolation is None:
            with self.snapshot.swapped_in():
                hidden = self.hidden(batch)
                weight = self.head_weight.detach().clone() if head_is_swapped else None
            return hidden, weight
        # interpolate: a * initial_logits + (1 - a) * current_logits
        a = weights.interpolation
        current = self.hidden(batch)
        with self.snapshot.swapped_in():
            initial = self.hidden(batch)
            initial_weight = self.head_weight.detach().clone() if head_is_swapped else None
        if initial_weight is None:
            return a * initial + (1 - a) * current, None
        weight = torch.cat([initial_weight, self.head_weight.detach()], dim=1)
        return torch.cat([a * initial, (1 - a) * current], dim=1), weight

    def after_student_update(self) -> None:
        if self.teacher_weights.ema_decay is not None:
            self.snapshot.ema_update(self.teacher_weights.ema_decay)
