"""Word the outcome of running a response against tests the way a teacher should see it, and the
weaker *script* mode of running tests.

Shared by the code tasks (HumanEval, JSONL with ``tests``). Two modes, named in ``info["mode"]``:

- ``judge`` (``judge.py``): the tests run in the trusted trainer process and only the response runs
  in the sandbox; values cross as plain data. Nothing in the sandbox can forge the verdict.
- ``script`` (:func:`run_tests`, for tests that are plain scripts over the response's globals, e.g.
  JSONL records without ``entry_point``): the response and the tests run in one sandboxed process
  (``driver.py``), which reports over a private pipe with a nonce. It stops the shortcuts a
  policy stumbles on, but code that goes looking (file descriptors, frames, ``gc``) can forge a
  pass; prefer the judge mode.

Either way the feedback names the failing assertion, the call that failed and what it returned, or
the exception, or the timeout.
"""

from __future__ import annotations

import json
import logging
import secrets
import signal
from dataclasses import dataclass, field
from pathlib import Path

from vpd_lightning.tasks.base import TRUNCATION_MARK
from vpd_lightning.tasks.sandbox.runner import SandboxLimits, SandboxResult, launch_plan, run_python

DRIVER_SOURCE = (Path(__file__).with_name("driver.py")).read_text(encoding="utf-8")
RESPONSE = "<response>"
TESTS = "<tests>"
# The driver's own alarm fires this long before the sandbox's wall-clock kill, so it can say which
# call was running.
ALARM_MARGIN_S = 0.5
log = logging.getLogger(__name__)


@dataclass
class TestOutcome:
    """Whether every test ran and passed, what to tell the model, and details for logging."""

    passed: bool
    feedback: str
    info: dict[str, object] = field(default_factory=dict)


def valid_text(text: str) -> str:
    """``text`` as valid Unicode: a lone surrogate (``raise ValueError('\\ud800')``), which no
    tokenizer or UTF-8 writer accepts, becomes U+FFFD."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return text


def truncate(text: str, limit: int) -> str:
    """Cut ``text`` to ``limit`` characters, marking the cut."""
    if len(text) <= limit:
        return text
    return text[: max(limit - len(TRUNCATION_MARK), 0)] + TRUNCATION_MARK


def run_tests(
    response_chunks: list[tuple[str, str]],
    test_chunks: list[tuple[str, str]],
    *,
    entry_point: str | None = None,
    check: str | None = None,
    limits: SandboxLimits | None = None,
) -> TestOutcome:
    """Script mode: execute ``response_chunks`` then ``test_chunks`` ((name, source) pairs) in one
    namespace of one sandboxed process (weaker than ``judge.run_judged``: see the module docstring).

    With ``check``, the tests define a function that is then called with the entry point (HumanEval's
    ``check(candidate)``); otherwise the tests are top-level asserts. With ``entry_point``, calls of
    that function are recorded for feedback and must return plain data.
    """
    limits = limits or SandboxLimits()
    if check is not None and entry_point is None:
        raise ValueError("run_tests: `check` needs an `entry_point` to call it with")
    nonce = secrets.token_hex(16)
    payload = {
        "response": [{"name": n, "source": s} for n, s in response_chunks],
        "tests": [{"name": n, "source": s} for n, s in test_chunks],
        "entry_point": entry_point,
        "check": check,
        "deadline_s": max(limits.timeout_s - ALARM_MARGIN_S, 0.1),
    }
    try:
        result = run_python(
            DRIVER_SOURCE,
            files={"payload.json": json.dumps(payload)},
            secret=nonce.encode(),
            limits=limits,
        )
    except OSError as exc:
        return sandbox_error(exc, "script")
    try:
        report = json.loads(result.report.decode("utf-8")) if result.report else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        report = {"status": "garbled"}
    if not isinstance(report, dict):
        report = {"status": "garbled"}
    if report.get("status") == "passed" and not (
        report.get("nonce") == nonce and result.returncode == 0
    ):
        report = {**report, "status": "forged"}
    outcome = outcome_from_report(report, result, entry_point, limits)
    outcome.info["mode"] = "script"
    return outcome


def sandbox_error(exc: OSError, mode: str) -> TestOutcome:
    """The sandbox could not start (no memory, no file descriptors, ...): this verdict fails, the
    trainer goes on, and the log says why."""
    log.warning("vpd_lightning sandbox: could not start a run: %s", exc)
    info = {"status": "sandbox_error", "mode": mode, "sandbox": launch_plan().isolation}
    return TestOutcome(False, f"The sandbox could not start ({exc}).", info)


def outcome_from_report(
    report: dict, result: SandboxResult, entry_point: str | None, limits: SandboxLimits
) -> TestOutcome:
    """Passed only if the trusted side's report says so; otherwise feedback from the report.
    Every text in the report came from the sandbox in part: it is made valid Unicode here."""
    report = {k: valid_text(v) if isinstance(v, str) else v for k, v in report.items()}
    status = str(report.get("status", "no_report"))
    if result.setup_failed and status != "passed":
        status = "sandbox_error"
    info: dict[str, object] = {
        "status": status,
        "duration_s": round(result.duration_s, 3),
        "returncode": result.returncode,
        "timed_out": result.timed_out,
        "calls": report.get("calls", 0),
        "error_type": report.get("error_type"),
        "network_isolated": result.network_isolated,
        "sandbox": result.isolation,
        "output": truncate(result.output, 1000),
    }
    if status == "passed":
        return TestOutcome(True, "All tests passed.", info)
    if status == "forged":
        return TestOutcome(False, "The response interfered with the test harness.", info)
    if status == "sandbox_error":
        return TestOutcome(False, "The sandbox could not be set up for this run.", info)
    return TestOutcome(False, _failure_text(report, result, entry_point, limits), info)


def _failure_text(
    report: dict, result: SandboxResult, entry_point: str | None, limits: SandboxLimits
) -> str:
    status = report.get("status", "no_report")
    call, returned = report.get("last_call"), report.get("last_result")
    error = f"{report.get('error_type')}: {report.get('message', '')}".rstrip(": ")
    if status == "timeout" and report.get("judge_clock"):
        after = f" after {call} returned {returned}" if call and returned is not None else ""
        return f"Timed out after {limits.timeout_s:g} s: the tests were still checking{after}."
    if result.timed_out or status == "timeout":
        where = f" while running {call}" if call and report.get("phase") == "tests" else ""
        return f"Timed out after {limits.timeout_s:g} s{where} (an infinite loop, or too slow)."
    if status == "error" and report.get("phase") == "response":
        if report.get("error_type") == "SystemExit":
            return "The code exited (SystemExit) before the tests ran."
        return f"The code failed to run: {error}{_code_line(report)}."
    if status == "missing_entry_point":
        return f"The code does not define the function `{entry_point}`."
    if status == "assertion":
        text = f"Test failed: {report.get('test_line') or 'assertion'}"
        if report.get("message"):
            text += f" ({report['message']})"
        if call is not None and returned is not None:
            text += f"\n{call} returned {returned}."
        return text
    if status == "error":
        if report.get("error_type") == "SystemExit":
            return "The code exited (SystemExit) during the tests."
        if report.get("in_response") and call:
            return f"{call} raised {error}{_code_line(report)}."
        line = f" at: {report['test_line']}" if report.get("test_line") else ""
        text = f"The tests raised {error}{line}"
        if call is not None and returned is not None:
            text += f"\n{call} returned {returned}."
        return text
    if status == "tampered":
        return f"The code tampered with the test harness ({report.get('problem')})."
    if status == "garbled":
        return "The code interfered with the test harness (it sent an invalid reply)."
    if status == "bad_return" and report.get("too_costly"):
        return f"{call} returned a value too costly to check: {report['too_costly']}."
    if status == "bad_return" and report.get("too_large"):
        return f"{call} returned a value too large to check (over 16 MB as data)."
    if status == "bad_return":
        kind, why = report.get("return_type"), str(report.get("why") or "")
        inner = f" ({why})" if why and f"a {kind} object" not in why else ""
        return (
            f"{call} returned a {kind} object{inner}; the tests need plain values "
            "(numbers, strings, lists, tuples, dicts, sets, None)."
        )
    return _death_text(result, limits)


def _code_line(report: dict) -> str:
    lineno = report.get("lineno")
    return f" (line {lineno} of the code)" if isinstance(lineno, int) else ""


def _death_text(result: SandboxResult, limits: SandboxLimits) -> str:
    """Why a program ended without a report, from its CPU time and exit status."""
    if result.cpu_s >= limits.cpu_s - 0.05:
        return f"The code exceeded the CPU time limit ({limits.cpu_s} s)."
    code = result.returncode
    if code is not None and code < 0:
        if -code == signal.SIGXFSZ:
            return "The code exceeded the file size limit."
        return f"The process was killed ({signal.Signals(-code).name})."
    return f"The program exited (code {code}) before the tests finished."
