"""`predict`: sample from a checkpoint (or the base model) on a task split, one JSONL line per attempt.

Each line holds the record's index, the attempt's number, the prompt, the completion, the reward
and the verifier's feedback; the last line printed is the accuracy (attempts with reward >= the
success threshold) and the mean reward. Sampling follows `model.validation` (greedy by default,
`num_samples` attempts per prompt, its `max_new_tokens`), as held-out evaluation does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from vpd_lightning.export import load_policy_weights
from vpd_lightning.rollout.sampling import answer_records
from vpd_lightning.trainer.module import VPDModule

PREDICT_SEED = 2_000_003


@dataclass
class PredictOptions:
    """What `predict` writes.

    Args:
        out: JSONL file to write, one line per attempt (overwritten).
        split: Task split to sample on (e.g. `test`, `train`).
        limit: Use the first `limit` records of the split (null: all).
        batch_size: Prompts per generate call.
    """

    out: str = "predictions.jsonl"
    split: str = "test"
    limit: int | None = None
    batch_size: int = 8


def predict(module: VPDModule, options: PredictOptions, ckpt_path: str | None) -> dict:
    """Write the attempts to `options.out` and return the summary."""
    if ckpt_path:
        load_policy_weights(module.policy.model, ckpt_path)
    module.eval()
    task = module.task
    records = task.records(options.split)
    records = records[: options.limit] if options.limit is not None else records
    params = module.opts.validation.sampling(
        module.opts.rollout, module.hparams.seed + PREDICT_SEED
    )
    out = Path(options.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rewards: list[float] = []
    with out.open("w", encoding="utf-8") as file, torch.no_grad():
        for start in range(0, len(records), options.batch_size):
            batch = records[start : start + options.batch_size]
            with module.policy.student():
                attempts = answer_records(
                    module.engine,
                    module.tokenizer,
                    task,
                    batch,
                    params,
                    module.hparams.verify_workers,
                )
            for i, (text, verdict) in enumerate(
                zip(attempts.texts, attempts.verdicts, strict=True)
            ):
                index, sample = divmod(i, attempts.n)
                line = {
                    "index": start + index,
                    "sample": sample,
                    "prompt": module.tokenizer.decode(attempts.prompt_ids[index]),
                    "completion": text,
                    "reward": float(verdict.reward),
                    "feedback": verdict.feedback,
                }
                file.write(json.dumps(line, ensure_ascii=False) + "\n")
                rewards.append(float(verdict.reward))
    successes = sum(r >= module.hparams.success_threshold for r in rewards)
    return {
        "out": str(out),
        "split": options.split,
        "prompts": len(records),
        "attempts": len(rewards),
        "accuracy": successes / len(rewards) if rewards else 0.0,
        "mean_reward": sum(rewards) / len(rewards) if rewards else 0.0,
        "checkpoint": ckpt_path or "(base model)",
    }
