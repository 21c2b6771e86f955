"""Rollouts: the sampling engine, sample-and-verify, chat prompts and the teacher's contexts."""

from vpd_lightning.rollout.contexts import (
    FeedbackSource,
    TeacherContext,
    TeacherContextBuilder,
)
from vpd_lightning.rollout.prompts import (
    question_text,
    render_messages,
    render_prompt,
    student_messages,
)

__all__ = [
    "FeedbackSource",
    "TeacherContext",
    "TeacherContextBuilder",
    "question_text",
    "render_messages",
    "render_prompt",
    "student_messages",
]
