"""Pulling answers and code out of free-form model responses."""

from __future__ import annotations

import math
import re

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def extract_tagged_answer(text: str) -> str | None:
    """The stripped content of the last ``<answer>...</answer>``, or None if there is none."""
    found = _ANSWER.findall(text)
    return found[-1].strip() if found else None


_INT = r"[-+]?\d[\d,]*(?:\.0+)?"
_OPEN = r"[*$`\\(\[]*\s*"  # markdown, currency or brackets before the number
_NOT_AN_OPERAND = r"(?![\d.,]*\d)(?!\s*[-+*/×÷^x]\s*[(\d])"
_ENDS_SENTENCE = r"(?=[*`)\]]*\s*(?:[.!;,\n]|$))"
# Statements a grader reads as a result, each capturing one integer; the last one wins.
_STATEMENTS = (
    re.compile(rf"\\boxed\{{\s*({_INT})\s*\}}"),
    re.compile(rf"(?:answer|result)\s*(?:is|:|=)\s*[:=]?\s*{_OPEN}({_INT}){_NOT_AN_OPERAND}", re.I),
    re.compile(rf"=\s*{_OPEN}({_INT}){_NOT_AN_OPERAND}"),
    re.compile(
        rf"\b(?:is|equals)\s+(?:actually\s+|equal to\s+)?{_OPEN}({_INT}){_NOT_AN_OPERAND}"
        rf"{_ENDS_SENTENCE}",
        re.I,
    ),
)
_ONLY_A_NUMBER = re.compile(rf"\W*({_INT})\W*")


def stated_answer(text: str) -> str | None:
    """The integer a grader would read as the response's final result, or None when unsure.

    The last, by position, of: ``\\boxed{n}``; "answer is n", "result: n"; ``= n`` ending a
    computation (n not followed by another operator); "... is n." or "equals n" ending a sentence.
    A response that is only a number is that number. Numbers in anything else (a restated
    question such as "Compute 2*3*4.", "Add 3 to 4: 5", "prints 2") are never quoted back.
    """
    found = [(m.start(1), m.group(1)) for pattern in _STATEMENTS for m in pattern.finditer(text)]
    if found:
        return max(found)[1]
    only = _ONLY_A_NUMBER.fullmatch(text)
    return only.group(1) if only else None


def parse_number(text: str) -> float | None:
    """A number written plainly (``-1,234``, ``3.5``, ``1e3``, ``$12``), or None."""
    cleaned = text.strip().strip("$").replace(",", "").replace(" ", "")
    if not _NUMBER.fullmatch(cleaned):
        return None
    value = float(cleaned)
    return value if math.isfinite(value) else None


def parse_int(text: str) -> int | None:
    """An integer written plainly (``42``, ``-1,234``, ``42.0``), or None."""
    value = parse_number(text)
    if value is None or not value.is_integer():
        return None
    return int(value)


def extract_code(text: str, entry_point: str | None = None) -> str:
    """The Python code in a response.

    Fenced blocks win: the first python (or untagged) block that defines ``entry_point``, else the
    longest such block. Without fences the whole response is taken as code.
    """
    blocks = [
        body
        for lang, body in _FENCE.findall(text)
        if lang.lower() in ("", "python", "py", "python3")
    ]
    if not blocks:
        return text
    if entry_point is not None:
        definition = re.compile(rf"^\s*(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", re.M)
        for body in blocks:
            if definition.search(body):
                return body
    return max(blocks, key=len)


def defines_function(code: str, name: str) -> bool:
    """Whether ``code`` has a top-level ``def name(``."""
    return re.search(rf"^(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.M) is not None
