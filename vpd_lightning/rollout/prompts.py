"""Turning records into chat messages and token ids with the model's own chat template.

Student and teacher prompts go through the same template, so the only difference between them is the
text of the last user message.
"""

from __future__ import annotations

from typing import Any

from vpd_lightning.tasks.base import Record

Message = dict[str, str]


def student_messages(record: Record) -> list[Message]:
    """Chat messages for the record: ``system`` (if any), then the prompt.

    A string prompt becomes one user message; a list of messages is used as is, after the system
    message unless it already starts with one.
    """
    prompt = record["prompt"]
    messages: list[Message] = []
    system = record.get("system")
    if isinstance(prompt, str):
        if system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": prompt})
        return messages
    if not isinstance(prompt, list) or not prompt:
        raise ValueError("record['prompt'] must be a string or a non-empty list of chat messages")
    if system and prompt[0].get("role") != "system":
        messages.append({"role": "system", "content": system})
    messages.extend(dict(m) for m in prompt)
    if not any(m.get("role") == "user" for m in messages):
        raise ValueError("record['prompt'] messages need at least one user message")
    return messages


def question_text(record: Record) -> str:
    """The question itself: the prompt string, or the last user message's content."""
    return _last_user(student_messages(record))["content"]


def with_question(record: Record, text: str) -> list[Message]:
    """The student's messages with the last user message's content replaced by ``text``."""
    messages = student_messages(record)
    _last_user(messages)["content"] = text
    return messages


def _last_user(messages: list[Message]) -> Message:
    return next(m for m in reversed(messages) if m.get("role") == "user")


def render_text(tokenizer: Any, messages: list[Message]) -> str:
    """The chat-templated prompt text, ending with the assistant turn's opening."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def render_messages(tokenizer: Any, messages: list[Message]) -> list[int]:
    """Token ids of the chat-templated prompt (the template already holds any special tokens)."""
    return list(tokenizer(render_text(tokenizer, messages), add_special_tokens=False)["input_ids"])


def render_prompt(tokenizer: Any, record: Record) -> list[int]:
    """The student's prompt ids for ``record``, ready for generation."""
    return render_messages(tokenizer, student_messages(record))
