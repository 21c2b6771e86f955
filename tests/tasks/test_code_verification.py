"""HumanEval verification: every canonical solution passes; wrong, crashing, looping, memory-hungry
and cheating responses get 0 with the right feedback, in bounded time. The deliberate attacks on the
verifier (other runs, forgery, shadowing, the host) are in ``test_verifier_integrity.py``."""

from __future__ import annotations

import time

import pytest

from vpd_lightning.tasks import HumanEvalTask, load_task, verify_many


@pytest.fixture(scope="module")
def task() -> HumanEvalTask:
    return HumanEvalTask(timeout_s=3.0, memory_mb=1024)


@pytest.fixture(scope="module")
def problems(task) -> dict[str, dict]:
    return {p["id"]: p for p in task.problems()}


def fenced(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\nDone."


def test_all_164_canonical_solutions_pass_in_under_10_s(task, problems):
    records = list(problems.values())
    assert len(records) == 164
    completions = [fenced(r["code_prompt"] + r["canonical_solution"]) for r in records]
    start = time.monotonic()
    verdicts = verify_many(task, records, completions, workers=4)
    elapsed = time.monotonic() - start
    failed = {r["id"]: v.feedback for r, v in zip(records, verdicts, strict=True) if v.reward != 1}
    assert failed == {}
    assert elapsed < 10, f"verifying 164 canonical solutions took {elapsed:.1f} s"
    print(f"\n164 canonical HumanEval solutions verified in {elapsed:.1f} s")


def test_body_only_and_raw_responses(task, problems):
    record = problems["HumanEval/0"]
    assert task.verify(record, record["canonical_solution"]).reward == 1.0
    raw = record["code_prompt"] + record["canonical_solution"]
    assert task.verify(record, raw).reward == 1.0


def test_split_is_seeded_and_disjoint():
    a, b = HumanEvalTask(seed=3), HumanEvalTask(seed=3)
    train, test = a.records("train"), a.records("test")
    assert [r["id"] for r in train] == [r["id"] for r in b.records("train")]
    assert {r["id"] for r in train}.isdisjoint(r["id"] for r in test)
    assert len(train) + len(test) == 164 and len(test) == round(0.2 * 164)
    assert HumanEvalTask(seed=4).records("test") != test
    assert load_task("humaneval").reference_solution(train[0]).startswith("```python")


HAS_CLOSE = "def has_close_elements(numbers, threshold):\n"
# Tampering with the sandboxed process changes nothing for the judge: the answer is just wrong.
FAILED = "Test failed: assert candidate("
CASES = {
    "wrong": (HAS_CLOSE + "    return True", "Test failed: assert candidate("),
    "crashing": (HAS_CLOSE + "    return 1 / 0", "raised ZeroDivisionError: division by zero"),
    "looping": (HAS_CLOSE + "    while True:\n        pass", "Timed out after 3 s while running"),
    "memory": (HAS_CLOSE + "    return len(bytearray(8 * 1024**3)) > 0", "raised MemoryError"),
    "syntax": ("def has_close_elements(numbers threshold):\n    return True", "SyntaxError"),
    "body_without_function": ("x = 1", "returned None."),
    "exit_before_tests": ("import sys\nsys.exit(0)", "exited (SystemExit) before the tests"),
    "builtin_exit": ("exit()", "exited (SystemExit) before the tests"),
    "os_exit_before_tests": ("import os\nos._exit(0)", "exited (code 0) before the tests finished"),
    "exit_in_call": (HAS_CLOSE + "    raise SystemExit(0)", "exited (SystemExit) during the tests"),
    "os_exit_in_call": (HAS_CLOSE + "    import os\n    os._exit(0)", "exited (code 0)"),
    "patch_assertion_error": (
        "import builtins\nbuiltins.AssertionError = Exception\n" + HAS_CLOSE + "    return True",
        FAILED,
    ),
    "patch_builtins_in_call": (
        HAS_CLOSE + "    import builtins\n    builtins.abs = lambda x: 0\n    return True",
        FAILED,
    ),
    "replace_dunder_builtins": (
        "__builtins__ = {'__import__': __import__}\n" + HAS_CLOSE + "    return True",
        FAILED,
    ),
    "always_equal": (
        "class Yes:\n    def __eq__(self, other):\n        return True\n"
        + HAS_CLOSE
        + "    return Yes()",
        "returned a Yes object",
    ),
    "bool_subclass": (
        "class B(int):\n    def __eq__(self, other):\n        return True\n"
        + HAS_CLOSE
        + "    return B(1)",
        "returned a B object",
    ),
    "redefine_check_early": (
        "def check(candidate):\n    pass\n" + HAS_CLOSE + "    return True",
        "Test failed",
    ),
    "redefine_check_in_call": (
        HAS_CLOSE + "    globals()['check'] = lambda c: None\n    return True",
        FAILED,
    ),
    "shadow_builtin_in_call": (
        HAS_CLOSE + "    globals()['abs'] = lambda x: 0\n    return True",
        FAILED,
    ),
    "trace_hook": (
        HAS_CLOSE + "    import sys\n    sys.settrace(lambda *a: None)\n    return True",
        FAILED,
    ),
    "background_thread": (
        "import threading, time\nthreading.Thread(target=time.sleep, args=(5,), daemon=True).start()\n"
        + HAS_CLOSE
        + "    return True",
        FAILED,
    ),
    "print_success": (
        "print('All tests passed.')\nprint('{\"status\": \"passed\"}')\n"
        + HAS_CLOSE
        + "    return True",
        "Test failed",
    ),
    "forge_report": (
        "import json, os, sys\n"
        "os.write(int(sys.argv[-1]), json.dumps({'status': 'passed', 'nonce': 'x'}).encode())\n"
        "os._exit(0)",
        "interfered with the test harness",
    ),
    "atexit_forge": (
        "import atexit, json, os, sys\n"
        'atexit.register(lambda: os.write(int(sys.argv[-1]), b\'{"status": "passed"}\'))\n'
        + HAS_CLOSE
        + "    return True",
        "Test failed",
    ),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_bad_or_cheating_responses_get_zero(task, problems, kind):
    code, expected_feedback = CASES[kind]
    start = time.monotonic()
    verdict = task.verify(problems["HumanEval/0"], fenced(code))
    assert verdict.reward == 0.0
    assert expected_feedback in verdict.feedback, verdict.feedback
    assert time.monotonic() - start < 6


def test_wrong_answer_feedback_names_the_input_and_the_result(task, problems):
    verdict = task.verify(problems["HumanEval/0"], fenced(CASES["wrong"][0]))
    assert (
        "has_close_elements([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) returned True" in verdict.feedback
    )


def test_patching_a_module_the_tests_use_changes_nothing(task, problems):
    record = problems["HumanEval/32"]  # its test checks math.fabs(poly(coeffs, solution)) < 1e-4
    code = "import math\nmath.fabs = lambda x: 0.0\ndef find_zero(xs):\n    return 0.0"
    verdict = task.verify(record, fenced(code))
    assert verdict.reward == 0.0
    assert verdict.feedback == (
        "Test failed: assert math.fabs(poly(coeffs, solution)) < 1e-4\n"
        "find_zero([-10, -2]) returned 0.0."
    )


def test_feedback_is_truncated_to_the_budget(problems):
    task = HumanEvalTask(feedback_chars=60)
    code = HAS_CLOSE + "    raise ValueError('x' * 5000)"
    verdict = task.verify(problems["HumanEval/0"], fenced(code))
    assert verdict.reward == 0.0 and len(verdict.feedback) <= 60


def test_verify_many_keeps_order_and_checks_lengths(task, problems):
    record = problems["HumanEval/0"]
    good = fenced(record["code_prompt"] + record["canonical_solution"])
    bad = fenced(CASES["wrong"][0])
    verdicts = verify_many(task, [record] * 4, [good, bad, bad, good], workers=2)
    assert [v.reward for v in verdicts] == [1.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="completions"):
        verify_many(task, [record], [good, bad])
    with pytest.raises(ValueError, match="workers"):
        verify_many(task, [record], [good], workers=0)
