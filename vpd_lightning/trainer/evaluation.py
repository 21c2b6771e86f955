"""Held-out evaluation: the teacher's repairs of the student's wrong answers (the student's own
answers are `rollout.sampling.answer_records`).

The module runs these with the right weights live (the student's, the teacher's) and logs the
rewards as metrics (`metrics.py`).
"""

from __future__ import annotations

from dataclasses import replace

from vpd_lightning.options import SamplingParams
from vpd_lightning.rollout import TeacherContextBuilder
from vpd_lightning.rollout.engine import RolloutEngine
from vpd_lightning.rollout.sampling import Attempts, sample_and_verify
from vpd_lightning.tasks import Task

# Seed offsets of the evaluation passes, apart from the training rollouts' (step, rank) seeds.
VALIDATION_SEED, TEACHER_VALIDATION_SEED = 17, 29


def teacher_answers(
    engine: RolloutEngine,
    tokenizer,
    task: Task,
    attempts: Attempts,
    feedback: TeacherContextBuilder,
    params: SamplingParams,
    seed: int,
    workers: int,
) -> Attempts:
    """One teacher answer per student attempt, from the verifier's feedback on that attempt.

    Only the student's wrong attempts count toward the repair rate (their feedback never states
    the answer; the feedback on a right one says it is right), but every attempt is answered so
    that all processes generate alike (FSDP2 gathers weights in `generate`)."""
    contexts = attempts.contexts(feedback)
    records = [r for r in attempts.records for _ in range(attempts.n)]
    prompts = [
        c.prompt_ids if c.has_context else attempts.prompt_ids[i]
        for i, group in enumerate(contexts)
        for c in group
    ]
    one_each = replace(params, num_samples=1, seed=seed)
    return sample_and_verify(engine, tokenizer, task, records, prompts, one_each, workers)
