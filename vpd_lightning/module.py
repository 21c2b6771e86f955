"""The LightningModule: rollouts, verification, teacher contexts, M-step, E-step.

What one training step is: one batch of `data.prompts_per_step` prompts per process, rolled out
`rollout.num_generations` times each, then one student update (the M-step, or the GRPO update),
and every `estep.every` steps one teacher update (the E-step) on the rollouts buffered since the
last one. `trainer.global_step` counts training steps: the teacher optimizer (and the extra
student updates of `updates_per_batch > 1`) are stepped through the strategy, precision-aware,
but not counted, so `max_steps`, logging and checkpoint intervals all count batches of prompts,
whatever the method.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from dataclasses import asdict, dataclass

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

import vpd_kernels as vk
from vpd_lightning.config import (
    DistillOptions,
    EStepOptions,
    FeedbackSource,
    GrpoOptions,
    LoraOptions,
    Method,
    RolloutOptions,
    SdpoOptions,
    TeacherMode,
    ValidationOptions,
)
from vpd_lightning.metrics import MeanAtN, PassAtK
from vpd_lightning.models import load_causal_lm, load_tokenizer
from vpd_lightning.objectives import (
    adapt_beta,
    bco_loss_terms,
    group_advantages,
    grpo_token_loss,
    implicit_reward,
    update_running_mean,
)
from vpd_lightning.policy import Policy
from vpd_lightning.rollout import HFGenerateEngine, SamplingParams
from vpd_lightning.sequences import PackedBatch, pack, per_sequence_sum
from vpd_lightning.tasks import Task, TeacherContextBuilder, render_prompt, verify_many

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
UNSUPPORTED_STRATEGIES = {
    "DeepSpeedStrategy": "DeepSpeed",
    "FSDPStrategy": "FSDP (v1)",
    "ModelParallelStrategy": "ModelParallelStrategy (FSDP2) is not wired up yet",
}


def check_strategy(strategy: object) -> None:
    """Refuse, before training, strategies that cannot step two optimizers by hand."""
    name = type(strategy).__name__
    if name in UNSUPPORTED_STRATEGIES:
        raise ValueError(
            f"{UNSUPPORTED_STRATEGIES[name]} cannot run this module's two manually stepped "
            "optimizers. Use trainer.strategy: ddp (multi-GPU) or auto (one device)."
        )


@dataclass
class Rollout:
    """One sampled response and everything both steps need about it (token ids only, no text)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    teacher_prompt_ids: list[int]
    reward: float
    has_context: bool


class VPDModule(pl.LightningModule):
    """Trains a Hugging Face causal LM with VPD, SDPO, OPSD or GRPO.

    Args:
        model: A transformers model id or folder, or `builtin:tiny-random` /
            `builtin:smollm2-135m-instruct`.
        method: `vpd` (E-step + M-step), `sdpo`, `opsd` (M-step only) or `grpo`.
        teacher_mode: VPD only. `shared`: teacher and student are one network (the paper's default);
            `adapter`: the teacher is its own LoRA adapter on the shared frozen base.
        lora: LoRA options; null for full fine-tuning.
        dtype: Weights' dtype.
        feedback_source: How each rollout's teacher context is built.
        max_context_tokens: Token budget of the context block (the question is never cut).
        rollout: Sampling options.
        distill: M-step divergence, trust region and hybrid GRPO weight.
        estep: E-step (BCO) options.
        sdpo: Passive-teacher options (SDPO).
        grpo: GRPO options (also for the hybrid term).
        validation: Held-out evaluation options.
        micro_batch_size: Sequences per forward/backward; gradients accumulate over the batch.
        updates_per_batch: Student updates per batch of rollouts (1: strictly on-policy).
        student_optimizer: Optimizer of the M-step (default AdamW, lr 1e-5).
        teacher_optimizer: Optimizer of the E-step (VPD only; default AdamW, lr 1e-5).
        student_scheduler: LR scheduler stepped after every student update.
        teacher_scheduler: LR scheduler stepped after every teacher update.
        student_grad_clip: Max gradient norm of the student update (null: no clipping).
        teacher_grad_clip: Max gradient norm of the teacher update (null: no clipping).
        max_nonfinite_in_a_row: Stop after this many consecutive non-finite losses.
        gradient_checkpointing: Recompute activations in backward to save memory.
        verify_workers: Parallel verifier workers.
        seed: Seed of the rollout sampling (combined with step and rank).
        task: Set from `data.task` by the CLI.
    """

    def __init__(
        self,
        model: str = "builtin:tiny-random",
        method: Method = "vpd",
        teacher_mode: TeacherMode = "shared",
        lora: LoraOptions | None = None,
        dtype: str = "float32",
        feedback_source: FeedbackSource = "verifier",
        max_context_tokens: int = 256,
        rollout: RolloutOptions | None = None,
        distill: DistillOptions | None = None,
        estep: EStepOptions | None = None,
        sdpo: SdpoOptions | None = None,
        grpo: GrpoOptions | None = None,
        validation: ValidationOptions | None = None,
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
        # Option groups are stored as plain dicts: checkpoints then load with weights_only=True.
        self.save_hyperparameters(
            ignore=[
                "task",
                "lora",
                "rollout",
                "distill",
                "estep",
                "sdpo",
                "grpo",
                "validation",
                "student_optimizer",
                "teacher_optimizer",
                "student_scheduler",
                "teacher_scheduler",
            ]
        )
        self.automatic_optimization = False
        self.method = method
        self.teacher_mode = teacher_mode
        self.feedback_source = feedback_source
        self.rollout_opts = _options(RolloutOptions, rollout)
        self.distill = _options(DistillOptions, distill)
        self.estep = _options(EStepOptions, estep)
        self.sdpo = _options(SdpoOptions, sdpo)
        self.grpo = _options(GrpoOptions, grpo)
        self.validation = _options(ValidationOptions, validation)
        self.micro_batch_size = micro_batch_size
        self.updates_per_batch = updates_per_batch
        self.student_grad_clip = student_grad_clip
        self.teacher_grad_clip = teacher_grad_clip
        self.max_nonfinite_in_a_row = max_nonfinite_in_a_row
        self.verify_workers = verify_workers
        self.seed = seed
        self.task = task
        self._optimizer_factories = (student_optimizer, teacher_optimizer)
        self._scheduler_factories = (student_scheduler, teacher_scheduler)
        lora = _options(LoraOptions, lora) if lora is not None else None
        self.hparams.update(
            lora=asdict(lora) if lora else None,
            rollout=asdict(self.rollout_opts),
            distill=asdict(self.distill),
            estep=asdict(self.estep),
            sdpo=asdict(self.sdpo),
            grpo=asdict(self.grpo),
            validation=asdict(self.validation),
        )
        self._check_options(dtype)

        self.tokenizer = load_tokenizer(model)
        network = load_causal_lm(model, DTYPES[dtype]).train()  # from_pretrained gives eval mode
        if gradient_checkpointing:
            network.gradient_checkpointing_enable()
            network.config.use_cache = False
        passive = {"sdpo": self.sdpo.teacher, "opsd": "initial"}.get(method)
        self.policy = Policy(
            network,
            lora,
            teacher_mode == "adapter",
            passive,
            self.sdpo,
            initial_prior=method == "vpd" and self.estep.prior == "initial",
        )
        eos_ids = {self.tokenizer.eos_token_id, *self._generation_eos_ids(network)}
        self.engine = HFGenerateEngine(self.policy.model, self.tokenizer.pad_token_id, eos_ids)

        # State that checkpoints carry (buffers) or that on_save_checkpoint adds.
        self.register_buffer("delta", torch.zeros((), dtype=torch.float64))
        self.register_buffer("beta", torch.tensor(self.estep.beta, dtype=torch.float64))
        self.estep_buffer: list[Rollout] = []
        self.steps_since_estep = 0
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self._rng_to_restore: dict | None = None
        self.last_validated_step: int | None = None

        n = self.validation.num_samples
        self.val_mean = MeanAtN()
        self.val_pass = torch.nn.ModuleDict({str(k): PassAtK(k) for k in self.validation.pass_k})
        self.val_teacher_mean = MeanAtN()
        self._val_n = n

    # ------------------------------------------------------------------------ validation of options
    def _check_options(self, dtype: str) -> None:
        method, d, e = self.method, self.distill, self.estep
        errors = []
        if dtype not in DTYPES:
            errors.append(f"model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if e.every < 1:
            errors.append(f"model.estep.every (F) must be >= 1, got {e.every}")
        if self.teacher_mode == "adapter" and method != "vpd":
            errors.append("model.teacher_mode: adapter is for method: vpd (the trained teacher)")
        if e.prior != "student" and method != "vpd":
            errors.append(f"model.estep.prior is VPD's E-step prior; method {method} has no E-step")
        if method == "opsd" and self.feedback_source != "reference":
            errors.append(
                "method: opsd shows the teacher the reference solution; set feedback_source: reference"
            )
        if method == "grpo" and d.grpo_coef:
            errors.append("distill.grpo_coef adds GRPO to vpd/sdpo; with method: grpo leave it 0")
        if self._optimizer_factories[1] is not None and method != "vpd":
            errors.append(f"model.teacher_optimizer is only used by method: vpd, not {method}")
        if self._scheduler_factories[1] is not None and method != "vpd":
            errors.append(f"model.teacher_scheduler is only used by method: vpd, not {method}")
        if (method == "grpo" or d.grpo_coef) and self.rollout_opts.num_generations < 2:
            errors.append("GRPO's group-relative advantage needs rollout.num_generations >= 2")
        if self.feedback_source == "sibling" and self.rollout_opts.num_generations < 2:
            errors.append("feedback_source: sibling needs rollout.num_generations >= 2")
        if d.trust_region_coef and self.updates_per_batch == 1:
            errors.append(
                "distill.trust_region_coef > 0 needs updates_per_batch > 1: with one update per "
                "batch the student is the rollout-time policy and the term is identically zero"
            )
        if d.divergence == "jsd" and not 0 < d.jsd_beta < 1:
            errors.append(f"distill.jsd_beta must be in (0, 1), got {d.jsd_beta}")
        if self.micro_batch_size < 1 or self.updates_per_batch < 1:
            errors.append("micro_batch_size and updates_per_batch must be >= 1")
        if max(self.validation.pass_k) > self.validation.num_samples:
            errors.append(
                f"validation.pass_k {self.validation.pass_k} needs validation.num_samples >= "
                f"{max(self.validation.pass_k)}"
            )
        if errors:
            raise ValueError("invalid model options:\n- " + "\n- ".join(errors))

    @staticmethod
    def _generation_eos_ids(network: torch.nn.Module) -> list[int]:
        eos = getattr(network.generation_config, "eos_token_id", None)
        if eos is None:
            return []
        return list(eos) if isinstance(eos, list | tuple) else [eos]

    # ------------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str) -> None:
        if self.task is None:
            datamodule = getattr(self.trainer, "datamodule", None)
            self.task = getattr(datamodule, "task", None)
        if self.task is None:
            raise ValueError("VPDModule needs a task: pass task=... or use VPDDataModule(task=...)")
        check_strategy(self.trainer.strategy)
        kwargs = getattr(self.trainer.strategy, "_ddp_kwargs", None)
        if kwargs is not None and self.policy.separate_teacher_adapter:
            # The M-step leaves the teacher adapter without gradients and the E-step the student's.
            kwargs["find_unused_parameters"] = True
        self.builder = TeacherContextBuilder(
            self.tokenizer,
            source=self.feedback_source,
            max_context_tokens=self.hparams.max_context_tokens,
            task=self.task,
            critique_fn=self._critique if self.feedback_source == "self_critique" else None,
        )

    def configure_optimizers(self):
        student_factory, teacher_factory = self._optimizer_factories
        student_sched, teacher_sched = self._scheduler_factories
        optimizers = [self._make_optimizer(student_factory, self.policy.student_parameters())]
        schedulers = [student_sched(optimizers[0]) if student_sched else None]
        if self.method == "vpd":
            optimizers.append(
                self._make_optimizer(teacher_factory, self.policy.teacher_parameters())
            )
            schedulers.append(teacher_sched(optimizers[1]) if teacher_sched else None)
        if all(s is None for s in schedulers):
            return optimizers
        return optimizers, [s for s in schedulers if s is not None]

    @staticmethod
    def _make_optimizer(factory: OptimizerCallable | None, params: list) -> torch.optim.Optimizer:
        if factory is None:
            return torch.optim.AdamW(params, lr=1e-5)
        return factory(params)

    def _optimizer_pair(self):
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        scheds = self.lr_schedulers()
        scheds = [] if scheds is None else scheds if isinstance(scheds, list) else [scheds]
        factories = self._scheduler_factories
        sched_iter = iter(scheds)
        paired = [next(sched_iter) if factories[i] else None for i in range(len(opts))]
        return opts, paired

    def on_train_start(self) -> None:
        if self._rng_to_restore is not None:
            _set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

    # ------------------------------------------------------------------------ one training step
    def training_step(self, batch: list[dict], batch_idx: int) -> None:
        step_start = time.perf_counter()
        rollouts, stats = self._collect_rollouts(batch)
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

        tokens = sum(len(r.completion_ids) for r in rollouts)
        stats["time/rollout_s"] = rollout_time
        stats["time/update_s"] = update_time
        stats["throughput/tokens_per_s"] = tokens / max(time.perf_counter() - step_start, 1e-9)
        stats["train/nonfinite_total"] = float(self.nonfinite_total)
        self.log_step_metrics(stats)
        self.log(
            "reward", stats["train/reward_mean"], prog_bar=True, logger=False, batch_size=len(batch)
        )

    def log_step_metrics(self, stats: dict[str, float]) -> None:
        """Send one step's metrics straight to the loggers (process 0's values).

        `self.log` would keep re-sending the last E-step's values on steps without an E-step;
        metrics that exist only on some steps must appear only on those steps.
        """
        if self.global_step % self.trainer.log_every_n_steps and not self.trainer.is_last_batch:
            return
        for logger in self.loggers:
            logger.log_metrics(stats, step=self.global_step)

    # ------------------------------------------------------------------------ rollouts
    def _rollout_seed(self) -> int:
        return (self.seed * 1_000_003 + self.global_step * 7919 + self.global_rank) % (2**63)

    def _collect_rollouts(self, records: list[dict]) -> tuple[list[Rollout], dict]:
        g = self.rollout_opts.num_generations
        prompts = [render_prompt(self.tokenizer, r) for r in records]
        params = SamplingParams(
            num_samples=g,
            temperature=self.rollout_opts.temperature,
            top_p=self.rollout_opts.top_p,
            max_new_tokens=self.rollout_opts.max_new_tokens,
            seed=self._rollout_seed(),
        )
        completions = self.engine.generate(prompts, params)
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        expanded = [r for r in records for _ in range(g)]
        verdicts = verify_many(self.task, expanded, texts, workers=self.verify_workers)

        groups = [slice(i * g, (i + 1) * g) for i in range(len(records))]
        if self.method == "grpo":
            contexts = [[None] * g for _ in records]
        else:
            contexts = self.builder.build_batch(
                records, [texts[s] for s in groups], [verdicts[s] for s in groups]
            )
        rollouts: list[Rollout] = []
        for i, group in enumerate(groups):
            for j, context in zip(range(group.start, group.stop), contexts[i], strict=True):
                has_context = context is not None and context.has_context
                rollouts.append(
                    Rollout(
                        prompt_ids=prompts[i],
                        completion_ids=completions[j],
                        teacher_prompt_ids=context.prompt_ids if has_context else prompts[i],
                        reward=float(verdicts[j].reward),
                        has_context=has_context,
                    )
                )
        rewards = torch.tensor([r.reward for r in rollouts])
        stats = {
            "train/reward_mean": rewards.mean().item(),
            "train/success_fraction": (rewards >= self.estep.success_threshold)
            .float()
            .mean()
            .item(),
            "train/context_coverage": sum(r.has_context for r in rollouts) / len(rollouts),
            "train/response_length": sum(len(r.completion_ids) for r in rollouts) / len(rollouts),
        }
        return rollouts, stats

    @torch.no_grad()
    def _critique(self, critique_prompts: list[str]) -> list[str]:
        """Self-critique: the student writes a critique of its own attempt (greedy)."""
        prompts = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
            )
            for text in critique_prompts
        ]
        params = SamplingParams(
            num_samples=1, temperature=0.0, max_new_tokens=self.hparams.max_context_tokens
        )
        with self.policy.student():
            out = self.engine.generate([list(_ids(p)) for p in prompts], params)
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)

    # ------------------------------------------------------------------------ M-step
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
        weight = self.policy.head_weight.detach()
        if self.policy.head_weight.requires_grad:
            weight = weight.clone()  # the head itself is trained: keep its rollout-time value
        with self.policy.student():
            return [
                (self.policy.hidden(self._pack(micro)), weight)
                for micro in self._micro_batches(rollouts)
            ]

    def _student_update(
        self,
        rollouts: list[Rollout],
        anchors: list[tuple[torch.Tensor, torch.Tensor]] | None,
        counted: bool,
    ) -> dict:
        """One student update: distillation to the teacher (and/or GRPO), accumulated over
        micro-batches so that memory is bounded by the micro-batch, not the batch."""
        opts, scheds = self._optimizer_pair()
        optimizer, scheduler = opts[0], scheds[0]
        uses_distill = self.method != "grpo"
        grpo_coef = 1.0 if self.method == "grpo" else self.distill.grpo_coef
        distill_tokens = max(sum(len(r.completion_ids) for r in rollouts if r.has_context), 1)
        all_tokens = max(sum(len(r.completion_ids) for r in rollouts), 1)
        advantages = None
        if grpo_coef:
            rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float32)
            advantages = group_advantages(
                rewards, self.rollout_opts.num_generations, self.grpo.normalize_std
            )

        totals = {"loss": 0.0, "divergence": 0.0, "entropy": 0.0, "grpo": 0.0, "ref_kl": 0.0}
        start = 0
        with self.policy.student():
            for index, micro in enumerate(self._micro_batches(rollouts)):
                anchor_hidden, anchor_weight = anchors[index] if anchors else (None, None)
                student = self._pack(micro)
                loss = torch.zeros((), device=self.device)
                hidden = None
                if uses_distill:
                    t_hidden, t_weight = self.policy.teacher_features(self._pack(micro, True))
                    hidden = self.policy.hidden(student)
                    token_mask = torch.tensor([r.has_context for r in micro], device=self.device)[
                        student.seq_index
                    ]
                    trust_region = anchor_hidden is not None and self.distill.trust_region_coef > 0
                    distill_sum, token_stats = vk.fused_linear_distill_loss(
                        hidden,
                        self.policy.head_weight,
                        t_hidden,
                        t_weight,
                        ref_hidden=anchor_hidden if trust_region else None,
                        ref_weight=anchor_weight if trust_region else None,
                        ref_coef=self.distill.trust_region_coef if trust_region else 0.0,
                        divergence=self.distill.divergence,
                        beta=self.distill.jsd_beta,
                        temperature=self.distill.temperature,
                        mask=token_mask,
                        reduction="sum",
                        return_stats=True,
                    )
                    if trust_region:
                        totals["ref_kl"] += float((token_stats.ref_kl * token_mask).sum())
                    loss = loss + distill_sum / distill_tokens
                    weights = token_mask.float()
                    totals["divergence"] += float((token_stats.divergence * weights).sum())
                    totals["entropy"] += float((token_stats.entropy * weights).sum())
                if grpo_coef:
                    hidden = self.policy.hidden(student) if hidden is None else hidden
                    logp = vk.fused_linear_token_logprobs(
                        hidden, self.policy.head_weight, student.targets
                    )
                    token_adv = advantages[start : start + len(micro)].to(self.device)[
                        student.seq_index
                    ]
                    old_logp = logp.detach()
                    if anchor_hidden is not None:
                        with torch.no_grad():
                            old_logp = vk.fused_linear_token_logprobs(
                                anchor_hidden, anchor_weight, student.targets
                            )
                    surrogate = grpo_token_loss(
                        logp, old_logp, token_adv, self.grpo.clip_low, self.grpo.clip_high
                    )
                    grpo_sum = surrogate.sum()
                    loss = loss + grpo_coef * grpo_sum / all_tokens
                    totals["grpo"] += float(grpo_sum.detach()) / all_tokens
                self.manual_backward(loss)
                totals["loss"] += float(loss.detach())
                start += len(micro)

        stats = {"mstep/loss": totals["loss"]}
        if uses_distill:
            stats["mstep/teacher_student_kl"] = totals["divergence"] / distill_tokens
            stats["mstep/student_entropy"] = totals["entropy"] / distill_tokens
            if anchors and self.distill.trust_region_coef:
                stats["mstep/trust_region_kl"] = totals["ref_kl"] / distill_tokens
        if grpo_coef:
            stats["mstep/grpo_loss"] = totals["grpo"]
        grad_norm = self._step(
            optimizer,
            scheduler,
            self.policy.student_parameters(),
            self.student_grad_clip,
            totals["loss"],
            counted=counted,
        )
        stats["mstep/grad_norm"] = grad_norm
        self.policy.after_student_update()
        return stats

    # ------------------------------------------------------------------------ E-step
    def _teacher_update(self, buffer: list[Rollout]) -> dict:
        """BCO on verifier labels: the implicit reward is measured against the prior (by default
        the current student, detached: the dynamic prior), and `delta` is a running mean of it."""
        opts, scheds = self._optimizer_pair()
        optimizer, scheduler = opts[1], scheds[1]
        beta = float(self.beta)
        threshold = self.estep.success_threshold
        weights = [1.0 if r.has_context else 0.0 for r in buffer]
        n_success = sum(w for w, r in zip(weights, buffer, strict=True) if r.reward >= threshold)
        n_failure = sum(w for w, r in zip(weights, buffer, strict=True) if r.reward < threshold)
        all_rewards, all_success, all_weights = [], [], []
        total_loss, kl_sum, kl_tokens = 0.0, 0.0, 0
        start = 0
        for micro in self._micro_batches(buffer):
            student, teacher = self._pack(micro), self._pack(micro, teacher=True)
            s_hidden, s_weight = self.policy.prior_features(student)
            with torch.no_grad():
                s_logp = vk.fused_linear_token_logprobs(s_hidden, s_weight, student.targets)
            with self.policy.trainable_teacher():
                t_hidden = self.policy.hidden(teacher)
                t_logp = vk.fused_linear_token_logprobs(
                    t_hidden, self.policy.head_weight, teacher.targets
                )
                if self.estep.target_kl is not None:
                    with torch.no_grad():  # KL(q || prior): forward KL seen from the prior
                        kl_sum += float(
                            vk.fused_linear_distill_loss(
                                s_hidden,
                                s_weight,
                                t_hidden.detach(),
                                self.policy.head_weight.detach(),
                                divergence="forward_kl",
                                reduction="sum",
                            )
                        )
                        kl_tokens += len(student.targets)
            s_seq = per_sequence_sum(s_logp, student)
            t_seq = per_sequence_sum(t_logp, teacher)
            if self.estep.length_normalize:
                lengths = torch.tensor(
                    [max(len(r.completion_ids), 1) for r in micro], device=self.device
                )
                s_seq, t_seq = s_seq / lengths, t_seq / lengths
            reward = implicit_reward(t_seq, s_seq, beta)
            success = torch.tensor([r.reward >= threshold for r in micro], device=self.device)
            weight = torch.tensor(weights[start : start + len(micro)], device=self.device)
            success_sum, failure_sum = bco_loss_terms(reward, success, self.delta, weight)
            loss = success_sum / max(n_success, 1.0) + failure_sum / max(n_failure, 1.0)
            self.manual_backward(loss)
            total_loss += float(loss.detach())
            all_rewards.append(reward.detach())
            all_success.append(success)
            all_weights.append(weight)
            start += len(micro)

        rewards, success = torch.cat(all_rewards), torch.cat(all_success)
        weight = torch.cat(all_weights)
        grad_norm = self._step(
            optimizer,
            scheduler,
            self.policy.teacher_parameters(),
            self.teacher_grad_clip,
            total_loss,
            counted=False,
        )
        stats = {"estep/loss": total_loss, "estep/grad_norm": grad_norm}
        if weight.sum() > 0:
            batch_mean = (rewards * weight).sum() / weight.sum()
            stats["estep/implicit_reward"] = float(batch_mean)
            if (success * weight).sum() > 0 and ((~success) * weight).sum() > 0:
                succ_mean = (rewards * weight * success).sum() / (weight * success).sum()
                fail_mean = (rewards * weight * ~success).sum() / (weight * ~success).sum()
                stats["estep/margin"] = float(succ_mean - fail_mean)
            update_running_mean(self.delta, batch_mean, self.estep.delta_momentum)
        if kl_tokens:
            measured = kl_sum / kl_tokens
            stats["estep/teacher_kl"] = measured
            e = self.estep
            self.beta.fill_(
                adapt_beta(beta, measured, e.target_kl, e.beta_rate, e.beta_min, e.beta_max)
            )
        return stats

    # ------------------------------------------------------------------------ optimizer steps
    def _step(
        self, optimizer, scheduler, params: list, clip: float | None, loss: float, counted: bool
    ) -> float:
        """Clip, step and zero one optimizer, unless the loss was non-finite (then skip it)."""
        finite = math.isfinite(loss)
        finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        grads = [p.grad for p in params if p.grad is not None]
        grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
            warnings.warn(
                f"non-finite loss at step {self.global_step}: update skipped "
                f"({self.nonfinite_in_a_row} in a row, {self.nonfinite_total} in all)",
                stacklevel=2,
            )
            if self.nonfinite_in_a_row >= self.max_nonfinite_in_a_row:
                raise RuntimeError(
                    f"{self.nonfinite_in_a_row} non-finite losses in a row: stopping. Lower the "
                    "learning rates, use dtype: float32, or check the data for empty responses."
                )
            return grad_norm
        self.nonfinite_in_a_row = 0
        if clip is not None:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")
        if counted:
            optimizer.step()
        else:  # through the strategy, so precision plugins apply, without counting a global step
            self.trainer.strategy.optimizer_step(optimizer.optimizer, closure=_no_closure)
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        return grad_norm

    # ------------------------------------------------------------------------ validation
    def validation_step(self, batch: list[dict], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self.last_validated_step = self.global_step

    def test_step(self, batch: list[dict], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, records: list[dict], prefix: str) -> None:
        v = self.validation
        n = v.num_samples
        prompts = [render_prompt(self.tokenizer, r) for r in records]
        params = SamplingParams(
            num_samples=n,
            temperature=v.temperature,
            top_p=v.top_p,
            max_new_tokens=v.max_new_tokens or self.rollout_opts.max_new_tokens,
            seed=self.seed + 17,
        )
        with self.policy.student():
            completions = self.engine.generate(prompts, params)
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        expanded = [r for r in records for _ in range(n)]
        verdicts = verify_many(self.task, expanded, texts, workers=self.verify_workers)
        rewards = torch.tensor([float(x.reward) for x in verdicts], device=self.device).view(-1, n)
        self.val_mean.update(rewards)
        self.log(
            f"{prefix}/mean@{n}",
            self.val_mean,
            on_epoch=True,
            prog_bar=True,
            batch_size=len(records),
        )
        for k, metric in self.val_pass.items():
            metric.update(rewards)
            self.log(f"{prefix}/pass@{k}", metric, on_epoch=True, batch_size=len(records))
        if v.teacher and self.method != "grpo":
            groups = [slice(i * n, (i + 1) * n) for i in range(len(records))]
            contexts = self.builder.build_batch(
                records, [texts[g] for g in groups], [verdicts[g] for g in groups]
            )
            teacher_prompts = [
                c.prompt_ids if c.has_context else prompts[i]
                for i, group in enumerate(contexts)
                for c in group
            ]
            with self.policy.trainable_teacher():
                answers = self.engine.generate(
                    teacher_prompts,
                    SamplingParams(
                        num_samples=1,
                        temperature=v.temperature,
                        top_p=v.top_p,
                        max_new_tokens=params.max_new_tokens,
                        seed=self.seed + 29,
                    ),
                )
            answer_texts = self.tokenizer.batch_decode(answers, skip_special_tokens=True)
            teacher_verdicts = verify_many(
                self.task, expanded, answer_texts, workers=self.verify_workers
            )
            teacher_rewards = torch.tensor(
                [float(x.reward) for x in teacher_verdicts], device=self.device
            ).view(-1, n)
            self.val_teacher_mean.update(teacher_rewards)
            self.log(
                f"{prefix}/teacher_mean@{n}",
                self.val_teacher_mean,
                on_epoch=True,
                batch_size=len(records),
            )

    # ------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["vpd_state"] = {
            "estep_buffer": [asdict(r) for r in self.estep_buffer],
            "steps_since_estep": self.steps_since_estep,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "nonfinite_total": self.nonfinite_total,
            "snapshot": self.policy.snapshot.state_dict() if self.policy.snapshot else None,
            "rng": _get_rng_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("vpd_state")
        if state is None:
            raise KeyError("this checkpoint was not written by VPDModule (no 'vpd_state')")
        self.estep_buffer = [Rollout(**r) for r in state["estep_buffer"]]
        self.steps_since_estep = state["steps_since_estep"]
        self.nonfinite_in_a_row = state["nonfinite_in_a_row"]
        self.nonfinite_total = state["nonfinite_total"]
        if self.policy.snapshot is not None:
            self.policy.snapshot.load_state_dict(state["snapshot"])
        self._rng_to_restore = state["rng"]


def _ids(encoded) -> list[int]:
    """apply_chat_template(tokenize=True) returns a list, or a BatchEncoding in newer releases."""
    return (
        encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded
    )


def _options(cls: type, value: object) -> object:
    """An option group from its dataclass, a dict (a checkpoint's hparams) or None (defaults)."""
    if value is None:
        return cls()
    return cls(**value) if isinstance(value, dict) else value


def _no_closure() -> None:
    return None


def _get_rng_state() -> dict:
    """Every RNG's state as tensors and plain values, so checkpoints load with weights_only."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
