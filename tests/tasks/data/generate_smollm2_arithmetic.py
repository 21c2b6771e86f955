"""Writes `smollm2_arithmetic.jsonl`: real SmolLM2-135M-Instruct answers to arithmetic prompts,
the fixture the answer parser is checked on (`tests/tasks/test_arithmetic_answers.py`).

Run once (minutes on 2 idle CPU cores; the committed responses took 20 under a load average of
9); each line's `label` is then set by hand to the answer a grader reads from the response (null:
none a grader could quote, or the response was cut off at the cap and is never parsed).

    .venv/bin/python tests/tasks/data/generate_smollm2_arithmetic.py
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vpd_lightning.options import LoraOptions, RolloutOptions, SamplingParams
from vpd_lightning.rollout.sampling import answer_records
from vpd_lightning.tasks import ArithmeticTask
from vpd_lightning.trainer.module import VPDModule

OUT = Path(__file__).with_name("smollm2_arithmetic.jsonl")
# The study's task (benchmarks/compare_methods.py's calibration): 24 held-out prompts.
TASKS = [(dict(num_ops=1, max_operand=10, operations="+-", num_test=128), 24)]
SAMPLES = 2  # per prompt, at the study's evaluation temperature


def main() -> None:
    torch.manual_seed(0)
    OUT.write_text("")
    for keywords, prompts in TASKS:
        task = ArithmeticTask(**keywords, answer_format="last_number", seed=0)
        module = VPDModule(
            model="builtin:smollm2-135m-instruct",
            lora=LoraOptions(r=16, alpha=32),
            rollout=RolloutOptions(max_new_tokens=160, engine="cached"),
            verify_workers=1,
            task=task,
        )
        records = task.records("test")[:prompts]
        params = SamplingParams(SAMPLES, 0.6, 1.0, 160, 0)
        with module.policy.student():
            attempts = answer_records(module.engine, module.tokenizer, task, records, params, 1)
        lines = []
        for i, text in enumerate(attempts.texts):
            record = attempts.records[i // SAMPLES]
            lines.append(
                {
                    "prompt": record["prompt"],
                    "expected": record["answer"],
                    "response": text,
                    "truncated": bool(attempts.verdicts[i].info.get("truncated")),
                    "label": None,
                }
            )
        with OUT.open("a") as out:  # each task as soon as it is done
            out.write("".join(json.dumps(line) + "\n" for line in lines))
        print(f"wrote {len(lines)} responses to {OUT}", flush=True)


if __name__ == "__main__":
    main()
