"""Writes `smollm2_arithmetic.jsonl`: real SmolLM2-135M-Instruct answers to arithmetic prompts,
the fixture the answer parser is checked on (`tests/tasks/test_arithmetic_answers.py`).

Run once (minutes on 2 idle CPU cores; the committed responses took 20 under a load average of
9); each line's `label` is then set by hand to the answer a grader reads from the response (null:
none a grader could quote, or the response was cut off at the cap and is never parsed).

    .venv/bin/python tests/tasks/data/generate_smollm2_arithmetic.py
    .venv/bin/python tests/tasks/data/generate_smollm2_arithmetic.py --held-out

`--held-out` writes `smollm2_arithmetic_heldout.jsonl`: the next 24 prompts of the test split with
another sampling seed, made after the parser was written against the first file, so the parser's
agreement on it is an out-of-sample figure.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vpd_lightning.options import LoraOptions, RolloutOptions, SamplingParams
from vpd_lightning.rollout.sampling import answer_records
from vpd_lightning.tasks import ArithmeticTask
from vpd_lightning.trainer.module import VPDModule

# The study's task (benchmarks/compare_methods.py's calibration): 24 held-out prompts.
TASKS = [(dict(num_ops=1, max_operand=10, operations="+-", num_test=128), 24)]
SAMPLES = 2  # per prompt, at the study's evaluation temperature


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--held-out", action="store_true")
    held_out = parser.parse_args().held_out
    name = "smollm2_arithmetic_heldout.jsonl" if held_out else "smollm2_arithmetic.jsonl"
    out_path, seed = Path(__file__).with_name(name), int(held_out)
    torch.manual_seed(seed)
    out_path.write_text("")
    for keywords, prompts in TASKS:
        task = ArithmeticTask(**keywords, answer_format="last_number", seed=0)
        module = VPDModule(
            model="builtin:smollm2-135m-instruct",
            lora=LoraOptions(r=16, alpha=32),
            rollout=RolloutOptions(max_new_tokens=160, engine="cached"),
            verify_workers=1,
            task=task,
        )
        first = prompts if held_out else 0
        records = task.records("test")[first : first + prompts]
        params = SamplingParams(SAMPLES, 0.6, 1.0, 160, seed)
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
        with out_path.open("a") as out:  # each task as soon as it is done
            out.write("".join(json.dumps(line) + "\n" for line in lines))
        print(f"wrote {len(lines)} responses to {out_path}", flush=True)


if __name__ == "__main__":
    main()
