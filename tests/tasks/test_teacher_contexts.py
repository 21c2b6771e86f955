"""Teacher contexts: sources, sibling choice, masking, truncation, and shared completion ids."""

from __future__ import annotations

import pytest

from vpd_lightning.rollout import TeacherContextBuilder, render_prompt
from vpd_lightning.tasks import ArithmeticTask, Verdict

RECORD = {"prompt": "Compute (2 + 3) * 4.", "system": "Answer in <answer></answer>.", "answer": 20}
QUESTION = RECORD["prompt"]
OK, BAD = Verdict(1.0, "Correct."), Verdict(0.0, "Your answer 14 is incorrect.")


def build(builder, record, completions, verdicts):
    """The contexts of one prompt's group of rollouts."""
    return builder.build_batch([record], [completions], [verdicts])[0]


def decode(tokenizer, ids):
    return tokenizer.decode(ids)


def test_student_prompt_uses_the_chat_template(tiny_tokenizer):
    text = decode(tiny_tokenizer, render_prompt(tiny_tokenizer, RECORD))
    assert text == (
        "<|im_start|>system\nAnswer in <answer></answer>.<|im_end|>\n"
        f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    )
    chat = {"prompt": [{"role": "user", "content": "hi"}], "system": "S"}
    assert decode(tiny_tokenizer, render_prompt(tiny_tokenizer, chat)).startswith(
        "<|im_start|>system\nS"
    )


def test_verifier_context_and_teacher_prompt_layout(tiny_tokenizer):
    builder = TeacherContextBuilder(tiny_tokenizer, source="verifier")
    contexts = build(builder, RECORD, ["<answer>20</answer>", "<answer>14</answer>"], [OK, BAD])
    assert [c.context for c in contexts] == ["Correct.", "Your answer 14 is incorrect."]
    assert all(c.has_context and c.source == "verifier" for c in contexts)
    text = decode(tiny_tokenizer, contexts[1].prompt_ids)
    assert text.startswith(
        "<|im_start|>system\nAnswer in <answer></answer>.<|im_end|>\n<|im_start|>user\n"
    )
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    q, c, i = (text.index(s) for s in (QUESTION, "Your answer 14", "answer the original question"))
    assert q < c < i


def test_empty_feedback_is_masked(tiny_tokenizer):
    builder = TeacherContextBuilder(tiny_tokenizer, source="verifier")
    (context,) = build(builder, RECORD, ["x"], [Verdict(0.0, "  ")])
    assert not context.has_context and context.context == ""
    assert context.prompt_ids == render_prompt(tiny_tokenizer, RECORD)


def test_sibling_never_picks_the_rollout_itself(tiny_tokenizer):
    builder = TeacherContextBuilder(tiny_tokenizer, source="sibling")
    completions = [f"response {i}" for i in range(6)]
    for pattern in range(1 << 6):
        verdicts = [OK if pattern >> i & 1 else BAD for i in range(6)]
        for i, context in enumerate(build(builder, RECORD, completions, verdicts)):
            successes = [j for j in range(6) if verdicts[j].reward >= 1.0 and j != i]
            if successes:
                assert context.source == "sibling" and context.context != completions[i]
                assert context.context in [completions[j] for j in successes]
            else:  # falls back to the rollout's own verifier feedback
                assert context.source == "verifier" and context.context == verdicts[i].feedback


def test_sibling_spreads_over_successes(tiny_tokenizer):
    builder = TeacherContextBuilder(tiny_tokenizer, source="sibling")
    contexts = build(builder, RECORD, ["a", "b", "c", "d"], [OK, BAD, OK, BAD])
    assert [c.context for c in contexts] == ["c", "c", "a", "a"]
    assert "A correct solution to this question:" in decode(tiny_tokenizer, contexts[1].prompt_ids)


def test_sibling_and_feedback_follows_sdpos_reference_rule(tiny_tokenizer):
    """SDPO's reference (environment_feedback_only_without_solution: True): a rollout with a
    successful sibling (never itself) sees that solution alone; without one, its own feedback."""
    builder = TeacherContextBuilder(tiny_tokenizer, source="sibling_and_feedback")
    contexts = build(builder, RECORD, ["a", "b", "c"], [OK, BAD, BAD])
    texts = [decode(tiny_tokenizer, c.prompt_ids) for c in contexts]
    assert all(c.has_context and c.source == "sibling_and_feedback" for c in contexts)
    assert "A correct solution" not in texts[0]  # the only success is the rollout itself
    assert contexts[0].context == "Feedback on an earlier attempt at this question:\nCorrect."
    for context, text in zip(contexts[1:], texts[1:], strict=True):
        assert context.context == "A correct solution to this question:\na"
        assert "Your answer 14" not in text  # its feedback is left out: a solution exists
        assert text.index(QUESTION) < text.index("A correct solution") < text.index("Using the")
    alone = build(builder, RECORD, ["x", "y"], [BAD, BAD])
    assert [c.context for c in alone] == ["Feedback on an earlier attempt at this question:\n"
                                          "Your answer 14 is incorrect."] * 2  # fmt: skip
    empty = build(builder, RECORD, ["x", "y"], [Verdict(0.0, ""), Verdict(0.0, " ")])
    assert not any(c.has_context for c in empty)  # nothing to show: masked, as the reference does


def test_sibling_and_feedback_always_shows_both_blocks(tiny_tokenizer):
    """The option that keeps the earlier rule: the sibling's solution, then the rollout's own
    feedback, each under its header."""
    builder = TeacherContextBuilder(tiny_tokenizer, source="sibling_and_feedback_always")
    contexts = build(builder, RECORD, ["a", "b", "c"], [OK, BAD, BAD])
    texts = [decode(tiny_tokenizer, c.prompt_ids) for c in contexts]
    assert all(c.source == "sibling_and_feedback_always" for c in contexts)
    assert "A correct solution" not in texts[0]
    for text in texts[1:]:
        solution = text.index("A correct solution to this question:\na")
        feedback = text.index("Feedback on an earlier attempt at this question:\nYour answer 14")
        assert text.index(QUESTION) < solution < feedback < text.index("Using the information")


def test_sibling_and_feedback_share_one_token_budget(tiny_tokenizer):
    """The solution comes first; the feedback gets what it leaves of max_context_tokens."""
    builder = TeacherContextBuilder(
        tiny_tokenizer, source="sibling_and_feedback_always", max_context_tokens=24
    )
    contexts = build(builder, RECORD, ["step " * 100, "b"], [OK, Verdict(0.0, "wrong " * 100)])
    header, body = contexts[1].context.split("\n", 1)
    assert header == "A correct solution to this question:" and body.endswith("...[truncated]")
    assert len(tiny_tokenizer(body, add_special_tokens=False)["input_ids"]) <= 24
    assert "Feedback" not in contexts[1].context  # nothing of the budget is left
    short = build(builder, RECORD, ["4 * 5", "b"], [OK, Verdict(0.0, "wrong " * 100)])[1].context
    solution, feedback = short.split("\n\n")
    assert solution.endswith("4 * 5") and feedback.endswith("...[truncated]")
    used = [len(tiny_tokenizer(part.split("\n", 1)[1], add_special_tokens=False)["input_ids"])
            for part in (solution, feedback)]  # fmt: skip
    assert sum(used) <= 24


def test_question_survives_truncation(tiny_tokenizer):
    long_question = "Question: " + "why? " * 200
    record = {"prompt": long_question}
    builder = TeacherContextBuilder(tiny_tokenizer, source="verifier", max_context_tokens=32)
    (context,) = build(builder, record, ["x"], [Verdict(0.0, "feedback " * 500)])
    assert context.context.endswith("...[truncated]")
    assert len(tiny_tokenizer(context.context, add_special_tokens=False)["input_ids"]) <= 32
    text = decode(tiny_tokenizer, context.prompt_ids)
    assert long_question in text and text.rstrip().endswith("assistant")


def test_the_teacher_prompt_ends_where_the_student_prompt_does(tiny_tokenizer):
    """Both end with the assistant turn's opening, so one completion's ids follow either."""
    builder = TeacherContextBuilder(tiny_tokenizer, source="verifier")
    student_prompt = render_prompt(tiny_tokenizer, RECORD)
    (context,) = build(builder, RECORD, ["<answer>20</answer>"], [OK])
    opening = tiny_tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert len(context.prompt_ids) > len(student_prompt)
    assert context.prompt_ids[-len(opening) :] == student_prompt[-len(opening) :] == opening


def test_self_critique(tiny_tokenizer):
    seen = []

    def critique_fn(prompts: list[str]) -> list[str]:
        seen.extend(prompts)
        return [f"critique {i}" for i in range(len(prompts))]

    builder = TeacherContextBuilder(tiny_tokenizer, source="self_critique", critique_fn=critique_fn)
    contexts = build(builder, RECORD, ["<answer>20</answer>", "<answer>14</answer>"], [OK, BAD])
    assert [c.context for c in contexts] == ["critique 0", "critique 1"]
    assert QUESTION in seen[1] and "<answer>14</answer>" in seen[1] and "is incorrect" in seen[1]
    assert "is correct" in seen[0]
    batch = builder.build_batch([RECORD, RECORD], [["a"], ["b", "c"]], [[OK], [BAD, OK]])
    assert [[c.context for c in group] for group in batch] == [
        ["critique 0"],
        ["critique 1", "critique 2"],
    ]
    broken = TeacherContextBuilder(tiny_tokenizer, source="self_critique", critique_fn=lambda p: [])
    with pytest.raises(ValueError, match="critique_fn returned 0"):
        build(broken, RECORD, ["a"], [OK])


def test_reference_context(tiny_tokenizer):
    task = ArithmeticTask(num_train=3, num_test=2)
    record = task.records("train")[0]
    builder = TeacherContextBuilder(tiny_tokenizer, source="reference", task=task)
    contexts = build(builder, record, ["a", "b"], [OK, BAD])
    assert all(c.context == task.reference_solution(record) for c in contexts)
    assert "A reference solution" in decode(tiny_tokenizer, contexts[0].prompt_ids)


def test_bad_builder_options(tiny_tokenizer):
    with pytest.raises(ValueError, match="source"):
        TeacherContextBuilder(tiny_tokenizer, source="oracle")
    with pytest.raises(ValueError, match="critique_fn"):
        TeacherContextBuilder(tiny_tokenizer, source="self_critique")
    with pytest.raises(ValueError, match="task"):
        TeacherContextBuilder(tiny_tokenizer, source="reference")
    with pytest.raises(ValueError, match="max_context_tokens"):
        TeacherContextBuilder(tiny_tokenizer, max_context_tokens=0)
    with pytest.raises(ValueError, match="verdicts"):
        build(TeacherContextBuilder(tiny_tokenizer), RECORD, ["a", "b"], [OK])


def test_success_threshold_decides_siblings_and_critique_outcomes(tiny_tokenizer):
    """Partial rewards count as successes once they reach the configured threshold."""
    half = Verdict(0.5, "half right")
    strict = TeacherContextBuilder(tiny_tokenizer, source="sibling")
    lenient = TeacherContextBuilder(tiny_tokenizer, source="sibling", success_threshold=0.5)
    completions = ["a", "b"]
    assert [c.source for c in build(strict, RECORD, completions, [half, BAD])] == ["verifier"] * 2
    assert build(lenient, RECORD, completions, [half, BAD])[1].context == "a"
    critique = lenient.critique_prompts(RECORD, ["a"], [half])[0]
    assert "the response is correct" in critique
    assert "the response is incorrect" in strict.critique_prompts(RECORD, ["a"], [half])[0]
