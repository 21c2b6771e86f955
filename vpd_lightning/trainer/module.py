"""The LightningModule: one training step as a page, Lightning's hooks, and the model's roles.

What one training step is: one batch of `data.prompts_per_step` prompts per process, rolled out
`rollout.num_generations` times each, then one student update (the M-step, or the GRPO update),
and every `estep.every` steps one teacher update (the E-step) on the rollouts buffered since the
last one. `trainer.global_step` counts training steps: the teacher optimizer (and the extra
student updates of `updates_per_batch > 1`) are stepped through the strategy, precision-aware,
but not counted, so `max_steps`, logging and checkpoint intervals all count batches of prompts,
whatever the method.

With several processes (DDP or FSDP2) a step's batch is every process's prompts: losses are
normalised by counts summed over processes, and delta, beta and the logged metrics are computed
over the global batch (`distributed.py`), so 2 processes on B prompts each train as one process on
the same 2B prompts.

Where the work is: what each method is (`algorithm/methods.py`), the updates (`algorithm/mstep.py`,
`algorithm/estep.py`), the step mechanics (`stepping.py`), rollouts (`rollout/`), the network in
its roles (`policy/`), evaluation (`evaluation.py`) and checkpoint state (`checkpoint.py`).
"""

from __future__ import annotations

import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch.distributed.tensor import DTensor

from vpd_lightning.algorithm.batches import MicroBatch, micro_batches
from vpd_lightning.algorithm.estep import EStep
from vpd_lightning.algorithm.methods import check_module_options
from vpd_lightning.algorithm.mstep import MStepTerms, rollout_time_anchors, student_update
from vpd_lightning.errors import UserInputError
from vpd_lightning.options import (
    DistillOptions,
    EStepOptions,
    GrpoOptions,
    LoraOptions,
    Method,
    OptionGroups,
    RolloutOptions,
    SdpoOptions,
    TeacherMode,
    ValidationOptions,
)
from vpd_lightning.policy.models import (
    generation_eos_ids,
    load_causal_lm,
    load_tokenizer,
    torch_dtype,
)
from vpd_lightning.policy.roles import Policy
from vpd_lightning.rollout import FeedbackSource, TeacherContextBuilder
from vpd_lightning.rollout.contexts import engine_critic
from vpd_lightning.rollout.engine import make_engine
from vpd_lightning.rollout.sampling import (
    Rollout,
    answer_records,
    collect_rollouts,
    rollout_stats,
)
from vpd_lightning.tasks import Task
from vpd_lightning.trainer import checkpoint, checkpoint_files
from vpd_lightning.trainer.distributed import mean_over_processes
from vpd_lightning.trainer.evaluation import (
    TEACHER_VALIDATION_SEED,
    VALIDATION_SEED,
    teacher_answers,
)
from vpd_lightning.trainer.half_precision import half_precision_update_warning
from vpd_lightning.trainer.metrics import MeanAtN, PassAtK, RepairRate
from vpd_lightning.trainer.seeding import mix_seed, set_rng_state
from vpd_lightning.trainer.stepping import NonFiniteGuard, Stepper
from vpd_lightning.trainer.strategies import check_strategy, is_sharded


class VPDModule(pl.LightningModule):
    """Trains a Hugging Face causal LM with VPD, SDPO, OPSD or GRPO.

    Args:
        model: A transformers model id or folder, or `builtin:tiny-random` /
            `builtin:smollm2-135m-instruct`.
        method: `vpd` (E-step + M-step), `sdpo`, `opsd` (M-step only) or `grpo`.
        teacher_mode: VPD only. `shared`: teacher and student are one network (the paper's
            default); `adapter`: the teacher is its own LoRA adapter on the shared frozen base.
        lora: LoRA options; null for full fine-tuning.
        dtype: Weights' dtype: `float32`, `bfloat16` or `float16`.
        feedback_source: The teacher's context: `verifier` feedback, a successful `sibling`'s
            response, SDPO's reprompt (`sibling_and_feedback`: the sibling's response, or the
            feedback when no sibling succeeded, as SDPO's reference runs it;
            `sibling_and_feedback_always`: both), a `self_critique`, or the task's `reference`
            solution; null: the method's own (vpd: verifier, sdpo: sibling_and_feedback, opsd:
            reference).
        max_context_tokens: Token budget of the context block (the question is never cut).
        success_threshold: A reward >= this is a success: BCO's labels, `sibling` contexts,
            the critique's outcome, the success fraction and pass@k.
        rollout: Sampling options.
        distill: M-step divergence, trust region and hybrid GRPO weight.
        estep: E-step (BCO) options.
        sdpo: Passive-teacher options (SDPO).
        grpo: GRPO options (also for the hybrid term).
        validation: Held-out evaluation options.
        micro_batch_size: Sequences per forward/backward; gradients accumulate over the batch.
        updates_per_batch: Student updates per batch of rollouts (1: strictly on-policy).
        student_optimizer: Optimizer of the M-step (default AdamW, lr 1e-5).
        teacher_optimizer: Optimizer of the E-step (VPD only; null: the same class and settings
            as `student_optimizer`).
        student_scheduler: LR scheduler stepped after every student update.
        teacher_scheduler: LR scheduler stepped after every teacher update.
        student_grad_clip: Max gradient norm of the student update (null: no clipping).
        teacher_grad_clip: Max gradient norm of the teacher update (null: no clipping).
        max_nonfinite_in_a_row: Stop after this many consecutive non-finite losses of the
            student's or of the teacher's update (each counted on its own).
        gradient_checkpointing: Recompute activations in backward to save memory.
        verify_workers: Parallel verifier workers (code tasks).
        seed: Seed of the rollout sampling (mixed with step and rank).
        task: Set from `data.task` by the CLI.
    """

    def __init__(
        self,
        model: str = "builtin:tiny-random",
        method: Method = "vpd",
        teacher_mode: TeacherMode = "shared",
        lora: LoraOptions | None = None,
        dtype: str = "float32",
        feedback_source: FeedbackSource | None = None,
        max_context_tokens: int = 256,
        success_threshold: float = 1.0,
        rollout: RolloutOptions = RolloutOptions(),  # noqa: B008 (read-only)
        distill: DistillOptions = DistillOptions(),  # noqa: B008 (read-only)
        estep: EStepOptions = EStepOptions(),  # noqa: B008 (read-only)
        sdpo: SdpoOptions = SdpoOptions(),  # noqa: B008 (read-only)
        grpo: GrpoOptions = GrpoOptions(),  # noqa: B008 (read-only)
        validation: ValidationOptions = ValidationOptions(),  # noqa: B008 (read-only)
        micro_batch_size: int = 8,
        updates_per_batch: int = 1,
        student_optimizer: OptimizerCallable | None = None,
        teacher_optimizer: OptimizerCallable | None = None,
        student_scheduler: LRSchedulerCallable | None = None,
        teacher_scheduler: LRSchedulerCallable | None = None,
        student_grad_clip: float | None = 1.0,
        teacher_grad_clip: float | None = 1.0,
        max_nonfinite_in_a_row: int = 3,
        gradient_checkpointing: bool = False,
        verify_workers: int = 4,
        seed: int = 0,
        task: Task | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        given = locals()
        self.opts = OptionGroups.from_given(
            lora=lora,
            rollout=rollout,
            distill=distill,
            estep=estep,
            sdpo=sdpo,
            grpo=grpo,
            validation=validation,
        )
        self._optimizer_factories = {"student": student_optimizer, "teacher": teacher_optimizer}
        self._scheduler_factories = {"student": student_scheduler, "teacher": teacher_scheduler}
        self.spec, self.feedback_source = check_module_options(given, self.opts)
        self.task = task
        self.save_hyperparameters(
            ignore=[
                "task",
                *self.opts.as_hparams(),
                *(f"{r}_{k}" for r in ("student", "teacher") for k in ("optimizer", "scheduler")),
            ]
        )
        self.hparams.update(self.opts.as_hparams())

        # Everything above is cheap and checked; loading the model is the first costly thing.
        self.tokenizer = load_tokenizer(model)
        network = load_causal_lm(
            model, torch_dtype(dtype)
        ).train()  # from_pretrained gives eval mode
        if gradient_checkpointing:
            network.gradient_checkpointing_enable()
            network.config.use_cache = False
        self.policy = Policy(
            network,
            self.opts.lora,
            teacher_mode == "adapter",
            self.spec.teacher_weights(self.opts.sdpo),
            initial_prior=self.spec.trains_teacher and self.opts.estep.prior == "initial",
        )
        eos_ids = {self.tokenizer.eos_token_id, *generation_eos_ids(network)}
        self.engine = make_engine(
            self.opts.rollout.engine,
            self.policy,
            self.tokenizer.pad_token_id,
            eos_ids,
            self.opts.rollout.sampler_dtype,
        )

        # State that checkpoints carry (`on_save_checkpoint`).
        self.estep = EStep(self.opts.estep, success_threshold) if self.spec.trains_teacher else None
        self.guard = NonFiniteGuard(max_nonfinite_in_a_row)
        clips = {"student": student_grad_clip, "teacher": teacher_grad_clip}
        self.stepper = Stepper(self, self.guard, clips)
        self._rng_to_restore: dict | None = None
        self.last_validated_step: int | None = None

        self.val_mean = MeanAtN()
        self.val_pass = torch.nn.ModuleDict(
            {str(k): PassAtK(k, success_threshold) for k in self.opts.validation.pass_k}
        )
        self.val_teacher_repair = RepairRate(success_threshold)

    # ------------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str) -> None:
        if self.task is None:
            self.task = getattr(getattr(self.trainer, "datamodule", None), "task", None)
        if self.task is None:
            raise UserInputError(
                "VPDModule needs a task: pass task=... or use VPDDataModule(task=...)"
            )
        check_strategy(self.trainer.strategy)
        kwargs = getattr(self.trainer.strategy, "_ddp_kwargs", None)
        if kwargs is not None and self.policy.separate_teacher_adapter:
            # The M-step leaves the teacher adapter without gradients and the E-step the student's.
            kwargs["find_unused_parameters"] = True
        if self.opts.validation.teacher and self.task.feedback_reveals_answer:
            raise UserInputError(
                "model.validation.teacher = true: this task's feedback states the correct answer, "
                "so the teacher's held-out repair rate would measure copying; use feedback that "
                "does not (for example `diagnostic`) or set model.validation.teacher: false"
            )
        context = dict(
            max_context_tokens=self.hparams.max_context_tokens,
            success_threshold=self.hparams.success_threshold,
        )
        self.failure_feedback = TeacherContextBuilder(self.tokenizer, source="verifier", **context)
        critic = None
        if self.feedback_source == "self_critique":
            critic = engine_critic(self.engine, self.tokenizer, self.hparams.max_context_tokens)
        self.builder = TeacherContextBuilder(
            self.tokenizer, self.feedback_source, task=self.task, critique_fn=critic, **context
        )

    def configure_model(self) -> None:
        """FSDP2 only: shard the policy (DDP and one device train the model as loaded)."""
        if is_sharded(self.trainer.strategy):
            self.policy.shard(self.device_mesh["data_parallel"])

    def configure_optimizers(self):
        roles = {"student": self.policy.student_parameters()}
        if self.spec.trains_teacher:
            roles["teacher"] = self.policy.teacher_parameters()
        optimizers, schedulers = [], []
        for role, params in roles.items():
            # A null teacher optimizer takes the student's class and settings.
            factory = self._optimizer_factories[role] or self._optimizer_factories["student"]
            optimizers.append(factory(params) if factory else torch.optim.AdamW(params, lr=1e-5))
            scheduler = self._scheduler_factories[role]
            schedulers.append(scheduler(optimizers[-1]) if scheduler else None)
        self.has_scheduler = [s is not None for s in schedulers]
        if not any(self.has_scheduler):
            return optimizers
        return optimizers, [s for s in schedulers if s is not None]

    def on_train_start(self) -> None:
        groups = [g for o in self.trainer.optimizers for g in o.param_groups]
        warning = half_precision_update_warning(groups, str(self.trainer.precision))
        if warning:
            rank_zero_warn(warning)
        if self._rng_to_restore is not None:
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

    # ------------------------------------------------------------------------ one training step
    def training_step(self, batch: list[dict], batch_idx: int) -> dict[str, float]:
        step_start = time.perf_counter()
        rollouts = self.collect_rollouts(batch)
        stats = mean_over_processes(
            self.trainer.strategy,
            rollout_stats(rollouts, self.hparams.success_threshold),
            len(rollouts),
        )
        rollout_time = time.perf_counter() - step_start

        update_start = time.perf_counter()
        stats.update(self.update_student(rollouts))
        if self.estep is not None:
            if self.estep.add(rollouts):
                stats.update(
                    self.estep.update(self.policy, self.batches_of(self.estep.buffer), self.stepper)
                )
            stats["estep/delta"] = self.estep.delta
            stats["estep/beta"] = self.estep.beta
        update_time = time.perf_counter() - update_start

        (tokens,) = self.stepper.sum([sum(len(r.completion_ids) for r in rollouts)])
        stats["time/rollout_s"] = rollout_time
        stats["time/update_s"] = update_time
        stats["throughput/tokens_per_s"] = tokens / max(time.perf_counter() - step_start, 1e-9)
        stats["train/nonfinite_student_total"] = float(self.guard.total["student"])
        stats["train/nonfinite_teacher_total"] = float(self.guard.total["teacher"])
        self.log_step_metrics(stats)
        self.log(
            "reward", stats["train/reward_mean"], prog_bar=True, logger=False, batch_size=len(batch)
        )
        return stats  # the step's metrics, for callbacks (run/progress.py)

    def collect_rollouts(self, records: list[dict]) -> list[Rollout]:
        """This process's rollouts of `records`, seeded by (seed, step, rank), with contexts."""
        seed = mix_seed(self.hparams.seed, self.global_step, self.global_rank)
        return collect_rollouts(
            self.engine,
            self.tokenizer,
            self.task,
            records,
            self.opts.rollout.sampling(seed),
            self.hparams.verify_workers,
            self.builder if self.spec.distils else None,
        )

    def update_student(self, rollouts: list[Rollout]) -> dict[str, float]:
        """`updates_per_batch` student updates on the same rollouts; the first is the step."""
        batches = self.batches_of(rollouts, with_teacher=self.spec.distils)
        terms = MStepTerms(
            distill=self.spec.resolved_distill(self.opts.distill),
            grpo_coef=self.spec.grpo_coef(self.opts.distill),
            grpo=self.opts.grpo,
            sampling_temperature=self.opts.rollout.temperature,
            group_size=self.opts.rollout.num_generations,
        )
        repeats = self.hparams.updates_per_batch
        anchors = rollout_time_anchors(self.policy, batches) if repeats > 1 else None
        stats: dict[str, float] = {}
        for update in range(repeats):
            stats = student_update(self.policy, batches, terms, self.stepper, anchors, update == 0)
        return stats

    def batches_of(self, rollouts: list[Rollout], with_teacher: bool = True) -> list[MicroBatch]:
        return micro_batches(
            rollouts,
            self.hparams.micro_batch_size,
            self.tokenizer.pad_token_id,
            self.device,
            with_teacher,
        )

    def log_step_metrics(self, stats: dict[str, float]) -> None:
        """Send one step's metrics straight to the loggers (over every process's rollouts; times
        are process 0's).

        `self.log` would keep re-sending the last E-step's values on steps without an E-step;
        metrics that exist only on some steps must appear only on those steps.
        """
        if self.global_step % self.trainer.log_every_n_steps and not self.trainer.is_last_batch:
            return
        for logger in self.loggers:
            logger.log_metrics(stats, step=self.global_step)

    # ------------------------------------------------------------------------ evaluation
    def validation_step(self, batch: list[dict], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self.last_validated_step = self.global_step

    def test_step(self, batch: list[dict], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, records: list[dict], prefix: str) -> None:
        """mean@n and pass@k of the student; with `validation.teacher`, the teacher's repair rate."""
        v, workers = self.opts.validation, self.hparams.verify_workers
        params = v.sampling(self.opts.rollout, self.hparams.seed + VALIDATION_SEED)
        with self.policy.student():
            attempts = answer_records(
                self.engine, self.tokenizer, self.task, records, params, workers
            )
        rewards = attempts.rewards().to(self.device)
        size = len(records)
        self.val_mean.update(rewards)
        self.log(f"{prefix}/mean@{v.num_samples}", self.val_mean, prog_bar=True, batch_size=size)
        for k, metric in self.val_pass.items():
            metric.update(rewards)
            self.log(f"{prefix}/pass@{k}", metric, on_epoch=True, batch_size=size)
        if not (v.teacher and self.spec.distils):
            return
        with self.policy.distilled_teacher():
            answers = teacher_answers(
                self.engine,
                self.tokenizer,
                self.task,
                attempts,
                self.failure_feedback,
                params,
                self.hparams.seed + TEACHER_VALIDATION_SEED,
                workers,
            )
        self.val_teacher_repair.update(rewards.view(-1), answers.rewards().to(self.device).view(-1))
        self.log(f"{prefix}/teacher_repair_rate", self.val_teacher_repair, batch_size=size)

    # ------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, ckpt: dict) -> None:
        ckpt["vpd_state"] = checkpoint.run_state(
            self.estep,
            self.guard,
            self.policy.snapshot,
            [type(o).__name__ for o in self.trainer.strategy.optimizers],
        )
        if not any(isinstance(v, DTensor) for v in ckpt["state_dict"].values()):
            checkpoint_files.seal(ckpt)  # a file; a sharded folder carries checksums.json

    def on_load_checkpoint(self, ckpt: dict) -> None:
        fit = self.trainer.state.fn == "fit"
        world, rank = self.trainer.world_size, self.global_rank
        own = checkpoint.own_state(ckpt.get("vpd_state"), world, rank, fit)
        self._rng_to_restore = checkpoint.restore_run_state(
            ckpt["vpd_state"], own, self.estep, self.guard, self.policy.snapshot
        )
