"""Arithmetic: seeded generation, answer parsing, and feedback at each level."""

from __future__ import annotations

import pytest

from vpd_lightning.tasks import ArithmeticTask, load_task

RECORD = {
    "prompt": "Compute ((17 + 35) * 4) - 120.",
    "start": 17,
    "steps": [["+", 35], ["*", 4], ["-", 120]],
    "intermediates": [52, 208, 88],
    "answer": 88,
}


def task(level: str) -> ArithmeticTask:
    return ArithmeticTask(feedback=level, num_train=10, num_test=5)


def test_generation_is_seeded_consistent_and_disjoint():
    a, b = (
        ArithmeticTask(num_train=50, num_test=20, seed=1),
        ArithmeticTask(num_train=50, num_test=20, seed=1),
    )
    train, test = a.records("train"), a.records("test")
    assert train == b.records("train") and len(train) == 50 and len(test) == 20
    assert {r["expression"] for r in train}.isdisjoint(r["expression"] for r in test)
    assert ArithmeticTask(num_train=50, num_test=20, seed=2).records("train") != train
    for record in train:
        assert eval(record["expression"]) == record["answer"] == record["intermediates"][-1]
        assert record["prompt"].startswith("Compute") and "<answer>" in record["system"]
        assert a.verify(record, a.reference_solution(record)).reward == 1.0


def test_difficulty_knobs():
    records = ArithmeticTask(num_ops=5, max_operand=9, operations="+", num_train=20).records(
        "train"
    )
    for record in records:
        assert len(record["steps"]) == 5
        assert all(op == "+" and 1 <= x <= 9 for op, x in record["steps"])


@pytest.mark.parametrize("level", ["binary", "outcome", "diagnostic", "solution"])
def test_correct_answer(level):
    verdict = task(level).verify(RECORD, "Step 1: 17 + 35 = 52\n<answer> 88 </answer>")
    assert verdict.reward == 1.0 and verdict.feedback == "Correct: 88 is the right answer."


@pytest.mark.parametrize("level", ["outcome", "diagnostic", "solution"])
@pytest.mark.parametrize("response", ["The answer is 88.", "<answer>eighty-eight</answer>", ""])
def test_unparsable_answer_is_a_format_error(level, response):
    verdict = task(level).verify(RECORD, response)
    assert verdict.reward == 0.0 and verdict.feedback.startswith("Format error")
    assert verdict.info["format_ok"] is False
    assert ("The correct answer is 88" in verdict.feedback) == (level == "solution")


@pytest.mark.parametrize(
    "response",
    [
        "Step 1: 17 + 35 = 51\nStep 2: 51 * 4 = 204\n<answer>84</answer>",
        "Step 2: 52 * 4 = 210\n<answer>90</answer>",
        "The answer is eighty-eight.",
        "",
    ],
)
def test_binary_level_is_one_bit_whatever_went_wrong(response):
    verdict = task("binary").verify(RECORD, response)
    assert verdict.reward == 0.0 and verdict.feedback == "Your answer is incorrect."


def test_outcome_level_says_only_incorrect():
    verdict = task("outcome").verify(RECORD, "Step 2: 52 * 4 = 210\n<answer>90</answer>")
    assert verdict.reward == 0.0 and verdict.feedback == "Your answer 90 is incorrect."


@pytest.mark.parametrize(
    ("response", "expected", "step"),
    [
        (
            "Step 1: 17 + 35 = 52\nStep 2: 52 * 4 = 210\nStep 3: 210 - 120 = 90\n<answer>90</answer>",
            "Step 2 should compute 52 * 4; your result 210 is too high.",
            2,
        ),
        (
            "Step 1: 17 + 35 = 42\nStep 2: 42 * 4 = 168\n<answer>48</answer>",
            "Step 1 should compute 17 + 35; your result 42 is too low.",
            1,
        ),
        (
            "Step 1: 17 + 35 = 52\nStep 2: 52 * 4 = 208\nStep 3: 208 - 120 = -88\n<answer>-88</answer>",
            "Step 3 should compute 208 - 120; your result -88 has the wrong sign.",
            3,
        ),
        (
            "Step 1: 17 + 35 = 52\nStep 2: 52 * 4 = 208\nStep 3: 208 - 120 = 88\n<answer>89</answer>",
            "Your steps are right, but the final answer 89 is too high.",
            None,
        ),
        (
            "<answer>208</answer>",
            "Your answer equals the result after step 2 of 3; the remaining operations were not applied.",
            3,
        ),
        ("<answer>80</answer>", "The final answer is too low.", None),
        ("<answer>-5</answer>", "The final answer has the wrong sign.", None),
    ],
)
def test_diagnostic_names_the_first_wrong_intermediate(response, expected, step):
    verdict = task("diagnostic").verify(RECORD, response)
    assert verdict.reward == 0.0
    assert expected in verdict.feedback and verdict.feedback.startswith("Your answer")
    assert verdict.info["first_wrong_step"] == step
    assert "correct answer" not in verdict.feedback  # the diagnosis does not reveal the answer


def test_solution_level_adds_the_worked_answer():
    verdict = task("solution").verify(RECORD, "Step 2: 52 * 4 = 210\n<answer>90</answer>")
    assert "Step 2 should compute 52 * 4" in verdict.feedback
    assert verdict.feedback.endswith(
        "The correct answer is 88: Step 1: 17 + 35 = 52; Step 2: 52 * 4 = 208; Step 3: 208 - 120 = 88."
    )


def test_last_answer_tag_counts_and_commas_parse():
    record = {"start": 1000, "steps": [["+", 234]], "intermediates": [1234], "answer": 1234}
    verdict = task("outcome").verify(record, "<answer>1</answer> no wait <answer>1,234</answer>")
    assert verdict.reward == 1.0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_ops": 0}, "num_ops"),
        ({"max_operand": 1}, "max_operand"),
        ({"operations": "+/"}, "operations"),
        ({"feedback": "hints"}, "feedback"),
        ({"num_train": 0}, "num_train"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        load_task("arithmetic", **options)


def test_bad_split():
    with pytest.raises(ValueError, match="unknown split"):
        task("outcome").records("validation")


def test_last_number_format_reads_untagged_answers_and_tags_still_win():
    from vpd_lightning.tasks import ArithmeticTask

    task = ArithmeticTask(num_ops=1, max_operand=9, answer_format="last_number", seed=3)
    record = task.records("test")[0]
    expected = record["answer"]
    assert task.verify(record, f"so the result is {expected}.").reward == 1.0
    assert task.verify(record, f"it is {expected + 1}").reward == 0.0
    assert task.verify(record, f"{expected} <answer>{expected + 1}</answer>").reward == 0.0
    assert task.verify(record, "no digits here").feedback.startswith("Format error")
    strict = ArithmeticTask(num_ops=1, max_operand=9, seed=3)
    assert strict.verify(record, f"so the result is {expected}.").reward == 0.0
    with pytest.raises(ValueError, match="answer_format"):
        ArithmeticTask(answer_format="first")


def test_last_number_format_quotes_the_stated_result_not_the_last_integer():
    """The issue's case: a response that ends by restating another question is told about the
    result it stated (11), never about a number in the restatement (4); with no stated result
    there is nothing to quote, so nothing is."""
    from vpd_lightning.tasks import ArithmeticTask

    task = ArithmeticTask(num_ops=1, max_operand=9, answer_format="last_number", seed=3)
    record = {**task.records("test")[0], "answer": 13, "intermediates": [13]}
    verdict = task.verify(record, "8 + 5 = 11\nCompute 2*3*4.")
    assert verdict.info["answer"] == 11 and "Your answer 11 is incorrect" in verdict.feedback
    assert task.verify(record, "The answer is 13. Now compute 2*3*4.").reward == 1.0
    assert task.verify(record, "x = 8 + 5").feedback.startswith("Format error")
    assert task.verify(record, "\\boxed{13}").reward == 1.0
