"""The LightningModule: the training loop, the optimizer steps and Lightning's hooks.

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

The jobs this module delegates: options and their checks (`options.py`), sampling and verifying
(`rollouts.py`), the per-micro-batch losses (`losses.py`), the roles of the one network
(`policy.py`), strategies (`strategies.py`), sums over processes (`distributed.py`), non-finite
losses (`guard.py`) and RNG state (`seeding.py`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, replace
from functools import partial

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch.distributed.tensor import DTensor

from vpd_lightning.algorithm.losses import (
    MStepStats,
    MStepTerms,
    estep_loss,
    implicit_rewards,
    mstep_loss,
)
from vpd_lightning.algorithm.objectives import (
    adapt_beta,
    bias_corrected,
    group_advantages,
    update_running_mean,
)
from vpd_lightning.errors import UserInputError, require
from vpd_lightning.options import (
    DEFAULT_FEEDBACK_SOURCE,
    DTYPE_NAMES,
    DistillOptions,
    EStepOptions,
    GrpoOptions,
    LoraOptions,
    Method,
    RolloutOptions,
    SdpoOptions,
    TeacherMode,
    ValidationOptions,
    as_options,
    check_combinations,
    require_choice,
    require_finite,
    require_positive_int,
    resolved_topk,
)
from vpd_lightning.policy.models import load_causal_lm, load_tokenizer
from vpd_lightning.policy.packing import PackedBatch, pack
from vpd_lightning.policy.roles import Policy
from vpd_lightning.rollout import (
    FeedbackSource,
    TeacherContextBuilder,
    render_messages,
    render_prompt,
)
from vpd_lightning.rollout.engine import SamplingParams, make_engine
from vpd_lightning.rollout.sampling import Rollout, rollout_stats, sample_and_verify, to_rollouts
from vpd_lightning.tasks import Task
from vpd_lightning.trainer.distributed import (
    gather_objects,
    mean_over_processes,
    sum_over_processes,
)
from vpd_lightning.trainer.metrics import MeanAtN, PassAtK, RepairRate
from vpd_lightning.trainer.seeding import get_rng_state, mix_seed, set_rng_state
from vpd_lightning.trainer.stepping import NonFiniteGuard
from vpd_lightning.trainer.strategies import check_strategy, is_sharded

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OPTION_GROUPS = {
    "lora": LoraOptions,
    "rollout": RolloutOptions,
    "distill": DistillOptions,
    "estep": EStepOptions,
    "sdpo": SdpoOptions,
    "grpo": GrpoOptions,
    "validation": ValidationOptions,
}
ROLES = ("student", "teacher")
# Seed offsets of the evaluation passes, apart from the training rollouts' (step, rank) seeds.
VALIDATION_SEED, TEACHER_VALIDATION_SEED = 17, 29


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
            response, both (`sibling_and_feedback`, SDPO's reprompt), a `self_critique`, or the
            task's `reference` solution; null: the method's own (vpd: verifier, sdpo:
            sibling_and_feedback, opsd: reference).
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
        self.method = method
        self.teacher_mode = teacher_mode
        self.feedback_source = feedback_source
        self.success_threshold = success_threshold
        self.lora = as_options(LoraOptions, lora) if lora is not None else None
        self.rollout_opts = as_options(RolloutOptions, rollout)
        self.distill = as_options(DistillOptions, distill)
        self.estep = as_options(EStepOptions, estep)
        self.sdpo = as_options(SdpoOptions, sdpo)
        self.grpo = as_options(GrpoOptions, grpo)
        self.validation = as_options(ValidationOptions, validation)
        self.micro_batch_size = micro_batch_size
        self.updates_per_batch = updates_per_batch
        self.student_grad_clip = student_grad_clip
        self.teacher_grad_clip = teacher_grad_clip
        self.verify_workers = verify_workers
        self.seed = seed
        self.task = task
        self._optimizer_factories = (student_optimizer, teacher_optimizer)
        self._scheduler_factories = (student_scheduler, teacher_scheduler)
        self._check_options(locals())
        ignored = [
            "task",
            *OPTION_GROUPS,
            *(f"{r}_{k}" for r in ROLES for k in ("optimizer", "scheduler")),
        ]
        self.save_hyperparameters(ignore=ignored)
        self._store_option_groups()

        # Everything above is cheap and checked; loading the model is the first costly thing.
        self.tokenizer = load_tokenizer(model)
        network = load_causal_lm(model, DTYPES[dtype]).train()  # from_pretrained gives eval mode
        if gradient_checkpointing:
            network.gradient_checkpointing_enable()
            network.config.use_cache = False
        passive = {"sdpo": self.sdpo.teacher, "opsd": "initial"}.get(method)
        self.policy = Policy(
            network,
            self.lora,
            teacher_mode == "adapter",
            passive,
            self.sdpo,
            initial_prior=method == "vpd" and self.estep.prior == "initial",
        )
        eos_ids = {self.tokenizer.eos_token_id, *_generation_eos_ids(network)}
        self.engine = make_engine(
            self.rollout_opts.engine, self.policy, self.tokenizer.pad_token_id, eos_ids
        )

        # State that checkpoints carry (buffers) or that on_save_checkpoint adds.
        # BCO's running mean of the implicit reward, as an EMA and its update count (`delta`)
        self.register_buffer("delta_ema", torch.zeros((), dtype=torch.float64))
        self.register_buffer("delta_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("beta", torch.tensor(self.estep.beta, dtype=torch.float64))
        self.estep_buffer: list[Rollout] = []
        self.steps_since_estep = 0
        self.guard = NonFiniteGuard(max_nonfinite_in_a_row)
        self._rng_to_restore: dict | None = None
        self.last_validated_step: int | None = None

        self.val_mean = MeanAtN()
        self.val_pass = torch.nn.ModuleDict(
            {str(k): PassAtK(k, success_threshold) for k in self.validation.pass_k}
        )
        self.val_teacher_repair = RepairRate(success_threshold)

    # ------------------------------------------------------------------------ options
    def _check_options(self, given: dict) -> None:
        """Top-level options one by one, then the combinations (`options.check_combinations`)."""
        require_choice("model.method", self.method, Method)
        require_choice("model.teacher_mode", self.teacher_mode, TeacherMode)
        if self.feedback_source is None:
            self.feedback_source = DEFAULT_FEEDBACK_SOURCE[self.method]
        require_choice("model.feedback_source", self.feedback_source, FeedbackSource)
        require(
            given["dtype"] in DTYPE_NAMES,
            "model.dtype",
            given["dtype"],
            f"must be one of {', '.join(DTYPE_NAMES)}",
        )
        for name in (
            "max_context_tokens",
            "micro_batch_size",
            "updates_per_batch",
            "max_nonfinite_in_a_row",
            "verify_workers",
        ):
            require_positive_int(f"model.{name}", given[name])
        require_finite(
            "model.success_threshold", self.success_threshold, 1e-12, 1.0, "must be in (0, 1]"
        )
        for name in ("student_grad_clip", "teacher_grad_clip"):
            if given[name] is not None:
                require_finite(f"model.{name}", given[name], 1e-12, float("inf"), "must be > 0")
        check_combinations(
            method=self.method,
            teacher_mode=self.teacher_mode,
            feedback_source=self.feedback_source,
            lora=self.lora,
            rollout=self.rollout_opts,
            distill=self.distill,
            estep=self.estep,
            updates_per_batch=self.updates_per_batch,
            has_teacher_optimizer=self._optimizer_factories[1] is not None,
            has_teacher_scheduler=self._scheduler_factories[1] is not None,
        )

    def _store_option_groups(self) -> None:
        """Option groups go into hparams as plain dicts: checkpoints load with weights_only=True."""
        groups = {
            "lora": self.lora,
            "rollout": self.rollout_opts,
            "distill": self.distill,
            "estep": self.estep,
            "sdpo": self.sdpo,
            "grpo": self.grpo,
            "validation": self.validation,
        }
        self.hparams.update({k: asdict(v) if v is not None else None for k, v in groups.items()})

    # ------------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str) -> None:
        if self.task is None:
            datamodule = getattr(self.trainer, "datamodule", None)
            self.task = getattr(datamodule, "task", None)
        if self.task is None:
            raise UserInputError(
                "VPDModule needs a task: pass task=... or use VPDDataModule(task=...)"
            )
        check_strategy(self.trainer.strategy)
        kwargs = getattr(self.trainer.strategy, "_ddp_kwargs", None)
        if kwargs is not None and self.policy.separate_teacher_adapter:
            # The M-step leaves the teacher adapter without gradients and the E-step the student's.
            kwargs["find_unused_parameters"] = True
        if self.validation.teacher and self.task.feedback_reveals_answer:
            raise UserInputError(
                "model.validation.teacher = true: this task's feedback states the correct answer, "
                "so the teacher's held-out repair rate would measure copying; use feedback that "
                "does not (for example `diagnostic`) or set model.validation.teacher: false"
            )
        self.failure_feedback = TeacherContextBuilder(
            self.tokenizer,
            source="verifier",
            max_context_tokens=self.hparams.max_context_tokens,
            success_threshold=self.success_threshold,
        )
        self.builder = TeacherContextBuilder(
            self.tokenizer,
            source=self.feedback_source,
            max_context_tokens=self.hparams.max_context_tokens,
            task=self.task,
            critique_fn=self._critique if self.feedback_source == "self_critique" else None,
            success_threshold=self.success_threshold,
        )

    def configure_model(self) -> None:
        """FSDP2 only: shard the policy (DDP and one device train the model as loaded)."""
        if is_sharded(self.trainer.strategy):
            self.policy.shard(self.device_mesh["data_parallel"])

    def configure_optimizers(self):
        student_factory, teacher_factory = self._optimizer_factories
        student_sched, teacher_sched = self._scheduler_factories
        optimizers = [_make_optimizer(student_factory, self.policy.student_parameters())]
        schedulers = [student_sched(optimizers[0]) if student_sched else None]
        if self.method == "vpd":
            teacher_factory = teacher_factory or student_factory  # null: the student's settings
            optimizers.append(_make_optimizer(teacher_factory, self.policy.teacher_parameters()))
            schedulers.append(teacher_sched(optimizers[1]) if teacher_sched else None)
        if all(s is None for s in schedulers):
            return optimizers
        return optimizers, [s for s in schedulers if s is not None]

    def _optimizer_and_scheduler(self, role: int):
        """(optimizer, scheduler or None) of role 0 (student) or 1 (teacher)."""
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        scheds = self.lr_schedulers()
        scheds = [] if scheds is None else scheds if isinstance(scheds, list) else [scheds]
        present = [i for i, f in enumerate(self._scheduler_factories[: len(opts)]) if f]
        scheduler = scheds[present.index(role)] if role in present else None
        return opts[role], scheduler

    def on_train_start(self) -> None:
        if self._rng_to_restore is not None:
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

    # ------------------------------------------------------------------------ one training step
    def training_step(self, batch: list[dict], batch_idx: int) -> None:
        step_start = time.perf_counter()
        rollouts = self._collect_rollouts(batch)
        strategy = self.trainer.strategy
        stats = mean_over_processes(
            strategy, rollout_stats(rollouts, self.success_threshold), len(rollouts)
        )
        rollout_time = time.perf_counter() - step_start

        update_start = time.perf_counter()
        anchors = self._rollout_time_anchors(rollouts) if self.updates_per_batch > 1 else None
        for update in range(self.updates_per_batch):  # only the first counts as a global step
            stats.update(self._student_update(rollouts, anchors, counted=update == 0))
        if self.method == "vpd":
            self.estep_buffer.extend(rollouts)
            self.steps_since_estep += 1
            if self.steps_since_estep >= self.estep.every:
                stats.update(self._teacher_update(self.estep_buffer))
                self.estep_buffer = []
                self.steps_since_estep = 0
            stats["estep/delta"] = float(self.delta)
            stats["estep/beta"] = float(self.beta)
        update_time = time.perf_counter() - update_start

        (tokens,) = sum_over_processes(strategy, [sum(len(r.completion_ids) for r in rollouts)])
        stats["time/rollout_s"] = rollout_time
        stats["time/update_s"] = update_time
        stats["throughput/tokens_per_s"] = tokens / max(time.perf_counter() - step_start, 1e-9)
        stats["train/nonfinite_student_total"] = float(self.guard.total["student"])
        stats["train/nonfinite_teacher_total"] = float(self.guard.total["teacher"])
        self.log_step_metrics(stats)
        self.log(
            "reward", stats["train/reward_mean"], prog_bar=True, logger=False, batch_size=len(batch)
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

    # ------------------------------------------------------------------------ rollouts
    def _collect_rollouts(self, records: list[dict]) -> list[Rollout]:
        o = self.rollout_opts
        params = SamplingParams(
            num_samples=o.num_generations,
            temperature=o.temperature,
            top_p=o.top_p,
            max_new_tokens=o.max_new_tokens,
            seed=mix_seed(self.seed, self.global_step, self.global_rank),
        )
        prompts = [render_prompt(self.tokenizer, r) for r in records]
        attempts = sample_and_verify(
            self.engine, self.tokenizer, self.task, records, prompts, params, self.verify_workers
        )
        contexts = None
        if self.method != "grpo":
            groups = attempts.groups()
            contexts = self.builder.build_batch(
                records,
                [attempts.texts[g] for g in groups],
                [attempts.verdicts[g] for g in groups],
            )
        return to_rollouts(attempts, contexts)

    @torch.no_grad()
    def _critique(self, critique_prompts: list[str]) -> list[str]:
        """Self-critique: the student writes a critique of its own attempt (greedy)."""
        prompts = [
            render_messages(self.tokenizer, [{"role": "user", "content": text}])
            for text in critique_prompts
        ]
        params = SamplingParams(
            num_samples=1, temperature=0.0, max_new_tokens=self.hparams.max_context_tokens
        )
        with self.policy.student():
            out = self.engine.generate(prompts, params)
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)

    def _micro_batches(self, rollouts: list[Rollout]) -> list[list[Rollout]]:
        size = self.micro_batch_size
        return [rollouts[start : start + size] for start in range(0, len(rollouts), size)]

    def _pack(self, micro: list[Rollout], teacher: bool = False) -> PackedBatch:
        """The student's (or the teacher's) prompts, each followed by the same completion ids."""
        prompts = [r.teacher_prompt_ids if teacher else r.prompt_ids for r in micro]
        completions = [r.completion_ids for r in micro]
        return pack(prompts, completions, self.tokenizer.pad_token_id, self.device)

    @torch.no_grad()
    def _rollout_time_anchors(
        self, rollouts: list[Rollout]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per micro-batch (hidden, head weight) of the rollout-time policy, for several updates
        per batch: the trust-region anchor and GRPO's old log-probs."""

        def anchors() -> list[tuple[torch.Tensor, torch.Tensor]]:
            weight = self.policy.kept_head_weight()
            with self.policy.student():
                return [
                    (self.policy.hidden(self._pack(micro)), weight)
                    for micro in self._micro_batches(rollouts)
                ]

        return self.policy(anchors)

    # ------------------------------------------------------------------------ M-step
    def _student_update(
        self,
        rollouts: list[Rollout],
        anchors: list[tuple[torch.Tensor, torch.Tensor]] | None,
        counted: bool,
    ) -> dict:
        """One student update, accumulated over micro-batches (memory bounded by one)."""
        optimizer, scheduler = self._optimizer_and_scheduler(0)
        terms = MStepTerms(
            distill=(
                replace(self.distill, topk=resolved_topk(self.method, self.distill))
                if self.method != "grpo"
                else None
            ),
            grpo_coef=1.0 if self.method == "grpo" else self.distill.grpo_coef,
            grpo=self.grpo,
            sampling_temperature=self.rollout_opts.temperature,
        )
        strategy = self.trainer.strategy
        distill_sum, all_sum = sum_over_processes(
            strategy,
            [
                sum(len(r.completion_ids) for r in rollouts if r.has_context),
                sum(len(r.completion_ids) for r in rollouts),
            ],
        )
        distill_tokens, all_tokens = max(int(distill_sum), 1), max(int(all_sum), 1)
        advantages = None
        if terms.grpo_coef:
            rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float32)
            advantages = group_advantages(
                rewards, self.rollout_opts.num_generations, self.grpo.normalize_std
            )

        total_loss, totals, start = 0.0, MStepStats(), 0
        with self.policy.student():
            for index, micro in enumerate(self._micro_batches(rollouts)):
                loss, stats = self.policy(
                    partial(
                        mstep_loss,
                        self.policy,
                        self._pack(micro),
                        self._pack(micro, teacher=True),
                        terms=terms,
                        has_context=torch.tensor([r.has_context for r in micro]),
                        advantages=None
                        if advantages is None
                        else advantages[start : start + len(micro)],
                        anchor=anchors[index] if anchors else None,
                        distill_tokens=distill_tokens,
                        all_tokens=all_tokens,
                    )
                )
                self._backward_share(loss)
                total_loss += float(loss.detach())
                for name, value in asdict(stats).items():
                    setattr(totals, name, getattr(totals, name) + value)
                start += len(micro)
        finite = self._all_finite(total_loss)
        names = list(asdict(totals))
        summed = sum_over_processes(strategy, [total_loss, *(getattr(totals, n) for n in names)])
        total_loss, totals = summed[0], MStepStats(**dict(zip(names, summed[1:], strict=True)))

        out = {"mstep/loss": total_loss}
        if terms.distill is not None:
            out["mstep/teacher_student_kl"] = totals.divergence / distill_tokens
            out["mstep/student_entropy"] = totals.entropy / distill_tokens
            if anchors and self.distill.trust_region_coef:
                out["mstep/trust_region_kl"] = totals.trust_region_kl / distill_tokens
        if terms.grpo_coef:
            out["mstep/grpo_loss"] = totals.grpo
        grad_norm, skipped = self._step(
            "student",
            optimizer,
            scheduler,
            self.policy.student_parameters(),
            self.student_grad_clip,
            finite,
            counted=counted,
        )
        out["mstep/grad_norm"] = grad_norm
        out["mstep/skipped"] = float(skipped)
        if not skipped:
            self.policy.after_student_update()
        return out

    # ------------------------------------------------------------------------ E-step
    def _teacher_update(self, buffer: list[Rollout]) -> dict:
        """BCO on verifier labels: the implicit reward is measured against the prior (by default
        the current student, detached: the dynamic prior), and `delta` is a running mean of it.
        Label counts, delta and the KL that adapts beta are over every process's buffer."""
        optimizer, scheduler = self._optimizer_and_scheduler(1)
        strategy = self.trainer.strategy
        beta = float(self.beta)
        threshold = self.success_threshold
        weights = torch.tensor([1.0 if r.has_context else 0.0 for r in buffer])
        success = torch.tensor([r.reward >= threshold for r in buffer])
        n_success, n_failure = sum_over_processes(
            strategy, [float((weights * success).sum()), float((weights * ~success).sum())]
        )
        micro_batches = [self._estep_batch(micro) for micro in self._micro_batches(buffer)]
        self._update_delta(micro_batches, weights, beta)
        rewards, total_loss, kl_sum, kl_tokens, start = [], 0.0, 0.0, 0, 0
        for student, teacher, lengths in micro_batches:
            end = start + len(lengths)
            # Forward and backward in the teacher's context: gradient checkpointing recomputes
            # the forward during backward, and must do so with the teacher adapter active.
            with self.policy.trainable_teacher():
                loss, stats = self.policy(
                    partial(
                        estep_loss,
                        self.policy,
                        student,
                        teacher,
                        options=self.estep,
                        beta=beta,
                        delta=self.delta,
                        success=success[start:end].to(self.device),
                        weight=weights[start:end].to(self.device),
                        lengths=lengths,
                        n_success=n_success,
                        n_failure=n_failure,
                    )
                )
                self._backward_share(loss)
            total_loss += float(loss.detach())
            rewards.append(stats.rewards)
            kl_sum, kl_tokens = kl_sum + stats.kl_sum, kl_tokens + stats.kl_tokens
            start = end

        finite = self._all_finite(total_loss)
        reward = torch.cat(rewards).cpu().double()
        weights, success = weights.double(), success.double()
        (
            total_loss,
            reward_sum,
            weight_sum,
            success_reward,
            success_weight,
            failure_reward,
            failure_weight,
            kl_sum,
            kl_tokens,
        ) = sum_over_processes(
            strategy,
            [
                total_loss,
                float((reward * weights).sum()),
                float(weights.sum()),
                float((reward * weights * success).sum()),
                float((weights * success).sum()),
                float((reward * weights * (1 - success)).sum()),
                float((weights * (1 - success)).sum()),
                kl_sum,
                kl_tokens,
            ],
        )
        grad_norm, skipped = self._step(
            "teacher",
            optimizer,
            scheduler,
            self.policy.teacher_parameters(),
            self.teacher_grad_clip,
            finite,
            counted=False,
        )
        out = {
            "estep/loss": total_loss,
            "estep/grad_norm": grad_norm,
            "estep/skipped": float(skipped),
        }
        if weight_sum > 0:
            batch_mean = reward_sum / weight_sum
            out["estep/implicit_reward"] = batch_mean
            if success_weight > 0 and failure_weight > 0:
                out["estep/margin"] = (
                    success_reward / success_weight - failure_reward / failure_weight
                )
        if kl_tokens:
            measured = kl_sum / kl_tokens
            out["estep/teacher_kl"] = measured
            e = self.estep
            self.beta.fill_(
                adapt_beta(beta, measured, e.target_kl, e.beta_rate, e.beta_min, e.beta_max)
            )
        return out

    @property
    def delta(self) -> torch.Tensor:
        """BCO's delta: the bias-corrected EMA of the E-steps' mean implicit rewards."""
        value = bias_corrected(
            float(self.delta_ema), int(self.delta_updates), self.estep.delta_momentum
        )
        return torch.tensor(value, dtype=torch.float64, device=self.delta_ema.device)

    @torch.no_grad()
    def _update_delta(
        self,
        micro_batches: list[tuple[PackedBatch, PackedBatch, torch.Tensor]],
        weights: torch.Tensor,
        beta: float,
    ) -> None:
        """BCO's convention: this buffer's implicit rewards (every process's) enter the running
        mean before the loss uses it, so the first E-step's delta is its own batch mean. Costs
        one no-grad teacher and prior forward over the buffer."""
        total, start = 0.0, 0
        for student, teacher, lengths in micro_batches:
            end = start + len(lengths)
            with self.policy.trainable_teacher():
                reward, _, _ = self.policy(
                    partial(
                        implicit_rewards,
                        self.policy,
                        student,
                        teacher,
                        options=self.estep,
                        beta=beta,
                        lengths=lengths,
                    )
                )
            total += float((reward.double().cpu() * weights[start:end].double()).sum())
            start = end
        total, count = sum_over_processes(self.trainer.strategy, [total, float(weights.sum())])
        if count > 0 and math.isfinite(total):
            update_running_mean(
                self.delta_ema, self.delta_updates, total / count, self.estep.delta_momentum
            )

    def _estep_batch(self, micro: list[Rollout]) -> tuple[PackedBatch, PackedBatch, torch.Tensor]:
        """(student batch, teacher batch, response lengths) of one E-step micro-batch."""
        lengths = torch.tensor([len(r.completion_ids) for r in micro], device=self.device)
        return self._pack(micro), self._pack(micro, teacher=True), lengths

    # ------------------------------------------------------------------------ optimizer steps
    def _backward_share(self, loss: torch.Tensor) -> None:
        """Back-propagate this process's share of a loss normalised by global counts: DDP and
        FSDP2 average gradients over processes, so the world size makes it the global sum."""
        self.manual_backward(loss * self.trainer.world_size)

    def _all_finite(self, loss: float) -> bool:
        """Whether every process's loss is finite (one non-finite loss skips the update)."""
        finite = bool(torch.isfinite(torch.tensor(loss)).item())
        return bool(self.trainer.strategy.reduce_boolean_decision(finite, all=True))

    def _step(
        self,
        kind: str,
        optimizer,
        scheduler,
        params: list,
        clip: float | None,
        finite: bool,
        counted: bool,
    ) -> tuple[float, bool]:
        """Clip, step and zero one optimizer; (grad norm, whether the update was skipped).

        A non-finite loss (on any process: `finite` is already agreed) skips the update: the
        gradients are dropped and a counted step still advances `global_step` (an optimizer
        step without gradients changes nothing), so `max_steps` bounds a run whatever its losses.
        """
        grad_norm = _grad_norm(params)
        self.guard.record(kind, finite, self.global_step)
        if not finite:
            optimizer.zero_grad(set_to_none=True)
        elif clip is not None:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")
        if counted:
            optimizer.step()
        elif finite:  # through the strategy, so precision plugins apply, without counting a step
            self.trainer.strategy.optimizer_step(optimizer.optimizer, closure=_no_closure)
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None and (counted or finite):
            scheduler.step()
        return grad_norm, not finite

    # ------------------------------------------------------------------------ evaluation
    def validation_step(self, batch: list[dict], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self.last_validated_step = self.global_step

    def test_step(self, batch: list[dict], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, records: list[dict], prefix: str) -> None:
        v = self.validation
        n = v.num_samples
        params = SamplingParams(
            num_samples=n,
            temperature=v.temperature,
            top_p=v.top_p,
            max_new_tokens=v.max_new_tokens or self.rollout_opts.max_new_tokens,
            seed=self.seed + VALIDATION_SEED,
        )
        prompts = [render_prompt(self.tokenizer, r) for r in records]
        with self.policy.student():
            attempts = sample_and_verify(
                self.engine,
                self.tokenizer,
                self.task,
                records,
                prompts,
                params,
                self.verify_workers,
            )
        rewards = attempts.rewards().to(self.device)
        batch_size = len(records)
        self.val_mean.update(rewards)
        self.log(
            f"{prefix}/mean@{n}", self.val_mean, on_epoch=True, prog_bar=True, batch_size=batch_size
        )
        for k, metric in self.val_pass.items():
            metric.update(rewards)
            self.log(f"{prefix}/pass@{k}", metric, on_epoch=True, batch_size=batch_size)
        if v.teacher and self.method != "grpo":
            self._evaluate_teacher(attempts, params, prefix)

    def _evaluate_teacher(self, attempts, params: SamplingParams, prefix: str) -> None:
        """The teacher's repair rate: it answers each question again from the verifier's feedback
        on the student's attempt, and only the student's wrong attempts count, whose feedback
        never states the answer (the feedback on a right one says it is right). Every attempt is
        answered, so that all processes generate alike (FSDP2 gathers weights in `generate`)."""
        groups = attempts.groups()
        contexts = self.failure_feedback.build_batch(
            attempts.records,
            [attempts.texts[g] for g in groups],
            [attempts.verdicts[g] for g in groups],
        )
        records = [r for r in attempts.records for _ in range(attempts.n)]
        teacher_prompts = [
            c.prompt_ids if c.has_context else attempts.prompt_ids[i]
            for i, group in enumerate(contexts)
            for c in group
        ]
        teacher_params = SamplingParams(
            num_samples=1,
            temperature=params.temperature,
            top_p=params.top_p,
            max_new_tokens=params.max_new_tokens,
            seed=self.seed + TEACHER_VALIDATION_SEED,
        )
        with self.policy.trainable_teacher():
            answers = sample_and_verify(
                self.engine,
                self.tokenizer,
                self.task,
                records,
                teacher_prompts,
                teacher_params,
                self.verify_workers,
            )
        self.val_teacher_repair.update(
            attempts.rewards().to(self.device).view(-1), answers.rewards().to(self.device).view(-1)
        )
        self.log(
            f"{prefix}/teacher_repair_rate",
            self.val_teacher_repair,
            on_epoch=True,
            batch_size=len(attempts.records),
        )

    # ------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Runs on every process (process 0 writes): the E-step buffer and RNG states are each
        process's own and are kept per rank; the snapshot's shards are gathered under FSDP2."""
        per_rank = gather_objects(
            {"estep_buffer": [asdict(r) for r in self.estep_buffer], "rng": get_rng_state()}
        )
        checkpoint["vpd_state"] = {
            "per_rank": per_rank,
            "steps_since_estep": self.steps_since_estep,
            "nonfinite": self.guard.state_dict(),
            "snapshot": self.policy.snapshot.state_dict() if self.policy.snapshot else None,
            "optimizers": [
                type(o).__name__ for o in _as_list(self.optimizers(use_pl_optimizer=False))
            ],
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("vpd_state")
        if state is None:
            raise UserInputError("this checkpoint was not written by VPDModule (no 'vpd_state')")
        if "per_rank" not in state:
            raise UserInputError(
                "ckpt_path: written by an older vpd_lightning (no per-process state); resume "
                "from a checkpoint of this version"
            )
        per_rank = state["per_rank"]
        world = self.trainer.world_size
        if self.trainer.state.fn == "fit" and len(per_rank) != world:
            raise UserInputError(
                f"ckpt_path: written by {len(per_rank)} process(es), resumed with {world}: each "
                "process's prompts and E-step buffer depend on the number of processes; resume "
                f"with trainer.devices x trainer.num_nodes = {len(per_rank)}"
            )
        own = per_rank[min(self.global_rank, len(per_rank) - 1)]
        self.estep_buffer = [Rollout(**r) for r in own["estep_buffer"]]
        self._rng_to_restore = own["rng"]
        self.steps_since_estep = state["steps_since_estep"]
        self.guard.load_state_dict(state["nonfinite"])
        if self.policy.snapshot is not None:
            self.policy.snapshot.load_state_dict(state["snapshot"])


def _make_optimizer(factory: OptimizerCallable | None, params: list) -> torch.optim.Optimizer:
    if factory is None:
        return torch.optim.AdamW(params, lr=1e-5)
    return factory(params)


def _generation_eos_ids(network: torch.nn.Module) -> list[int]:
    eos = getattr(network.generation_config, "eos_token_id", None)
    if eos is None:
        return []
    return list(eos) if isinstance(eos, list | tuple) else [eos]


def _grad_norm(params: list) -> float:
    """The global gradient norm (under FSDP2 the gradients are shards: their norm is reduced)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _no_closure() -> None:
    return None
