"""The trusted judge: tests run here, only the response's code runs in the sandbox.

``run_judged`` starts the response in a sandbox (``server.py`` runs its code and answers
calls), then executes the trusted test code in this process with the entry point bound to a
:class:`Candidate`: a stand-in that sends each call's arguments to the sandbox as plain data and
returns what comes back, decoded as plain data (``wire.py``: numbers, strings, bytes, lists, tuples,
sets, dicts, None; never pickle, never objects with behaviour). The tests' helpers and imports come
from trusted code (HumanEval's prompt), the expected values and the verdict never enter the sandbox,
so nothing the response does there can decide or forge the verdict, and redefining a helper or a
builtin there changes only its own answers.

The judge bounds its own work on what the response sends: decoding has budgets (``wire.py``), the
tests run under the run's wall-clock deadline (:class:`_Clock`), text from the sandbox is made
valid Unicode before it reaches feedback, and a candidate's exception never takes a form that
steers the tests' control flow (``StopIteration`` would end ``all(map(candidate, ...))`` as
if every item passed).

Test code gets a private ``random`` module (some HumanEval checks seed or draw from ``random``), so
checks running in parallel threads neither disturb each other nor the trainer's random state.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import importlib.util
import marshal
import math
import reprlib
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from vpd_lightning.tasks.sandbox import wire
from vpd_lightning.tasks.sandbox.harness import (
    TestOutcome,
    outcome_from_report,
    sandbox_error,
    valid_text,
)
from vpd_lightning.tasks.sandbox.runner import (
    SandboxClosed,
    SandboxLimits,
    SandboxProcess,
)

SERVER_SOURCE = Path(__file__).with_name("server.py").read_text(encoding="utf-8")
WIRE_SOURCE = Path(wire.__file__).read_text(encoding="utf-8")
_FATAL = ("SystemExit", "KeyboardInterrupt", "GeneratorExit")
# Raised as these, a candidate's exception would end the loop of the trusted code that called it
# (`all(map(candidate, xs))` is True): they arrive as a plain CandidateRaised of that name.
_ITERATION_ENDS = ("StopIteration", "StopAsyncIteration")
_LONG_INT_BITS = 4000  # str() of a larger int may be refused (Python's int-to-str digit limit)


class _ShortRepr(reprlib.Repr):
    """reprlib's short repr, which also shows ints too long for ``str`` (``7 ** 20000``)."""

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > _LONG_INT_BITS:
            sign = "-" if x < 0 else ""
            return f"<{sign}int of {int(math.log10(abs(x))) + 1} digits>"
        return super().repr_int(x, level)


_short = _ShortRepr()
_short.maxstring = _short.maxother = 80
_short.maxlist = _short.maxtuple = _short.maxset = _short.maxdict = 10
_short.maxlong = 80


class _Abort(BaseException):
    """Ends the tests with ``report`` (a BaseException, so test code cannot catch it)."""

    def __init__(self, report: dict) -> None:
        super().__init__(report.get("status"))
        self.report = report


class _OutOfTime(BaseException):
    """The trusted tests ran past the run's deadline (a BaseException: tests catch Exception)."""


class _Clock:
    """The trusted tests' own wall-clock budget, in the thread that runs them: a trace function
    checks the deadline at every Python call and at every line of the trusted code, and raises
    :class:`_OutOfTime` past it (CPython then stops tracing; ``expired`` decides the verdict, so a
    bare ``except:`` in a test that swallows it cannot turn the timeout into a pass)."""

    def __init__(self, deadline: float, trusted_files: set[str]) -> None:
        self.deadline, self.files, self.expired = deadline, trusted_files, False

    def _check(self) -> None:
        if time.monotonic() > self.deadline:
            self.expired = True
            raise _OutOfTime

    def _on_call(self, frame, event, arg):
        self._check()
        return self._on_line if frame.f_code.co_filename in self.files else None

    def _on_line(self, frame, event, arg):
        self._check()
        return self._on_line

    def __enter__(self) -> _Clock:
        self._previous = sys.gettrace()
        sys.settrace(self._on_call)
        return self

    def __exit__(self, *exc_info) -> None:
        sys.settrace(self._previous)

    @staticmethod
    @contextlib.contextmanager
    def paused():
        """No tracing while a call goes to the sandbox and its value is decoded: both are bounded
        already (the sandbox's deadline, the wire's budgets), and tracing made decoding 2x slower."""
        tracer = sys.gettrace()
        sys.settrace(None)
        try:
            yield
        finally:
            sys.settrace(tracer)


class CandidateRaised(Exception):
    """Base of the exceptions a candidate's call raises in the judge: a builtin exception type of
    the same name where there is one (so ``except ValueError`` in a test works), else this."""

    error_type = "Exception"
    lineno: int | None = None


@functools.lru_cache(maxsize=256)  # the names come from the response: bounded
def _raised_class(name: str) -> type[CandidateRaised]:
    base = getattr(builtins, name, None)
    if (
        isinstance(base, type)
        and issubclass(base, Exception)
        and not issubclass(base, Warning)
        and name not in _ITERATION_ENDS
    ):
        try:
            return type(name, (base, CandidateRaised), {"error_type": name})
        except TypeError:  # layout conflict
            pass
    return type(name, (CandidateRaised,), {"error_type": name})


def _raised(name: str, message: str, lineno: int | None) -> CandidateRaised:
    name = name if name.isidentifier() else "Exception"
    try:
        exc = _raised_class(name)(message)
    except Exception:  # a constructor that wants other arguments (UnicodeDecodeError, ...)
        exc = type(name, (CandidateRaised,), {"error_type": name})(message)
    exc.lineno = lineno
    return exc


class Candidate:
    """The response's function as the judge's tests see it; calls go to the sandbox as data."""

    def __init__(self, process: SandboxProcess, name: str, clock: _Clock | None = None) -> None:
        self.__name__ = self.__qualname__ = name
        self._process = process
        self._clock = clock
        self.calls = 0
        self.aborted: dict | None = None
        self.last_call: str | None = None
        self.last_result: str | None = None

    def __repr__(self) -> str:
        return f"<candidate {self.__name__}>"

    def _report(self, status: str, **fields) -> dict:
        return {
            "status": status,
            "calls": self.calls,
            "last_call": self.last_call,
            "last_result": self.last_result,
            **fields,
        }

    def receive(self, phase: str, budget: wire.Budget | None = None) -> dict:
        """One message from the sandbox, or _Abort (timeout, exit, garbage, too large); parsing it
        is charged to ``budget``, the judge's work on this message."""
        try:
            size = wire.size_of(self._process.receive(wire.HEADER_SIZE))
            if size > wire.MAX_MESSAGE:  # the program half never sends these: garbage
                raise _Abort(self._report("garbled", phase=phase))
            return wire.unpack(self._process.receive(size), budget)
        except wire.WireTooLarge as exc:
            raise _Abort(self._too_costly(exc, phase)) from None
        except TimeoutError:
            raise _Abort(self._report("timeout", phase=phase)) from None
        except SandboxClosed:
            raise _Abort(self._report("died", phase=phase)) from None
        except wire.WireError:
            raise _Abort(self._report("garbled", phase=phase)) from None

    def _too_costly(self, exc: wire.WireTooLarge, phase: str) -> dict:
        if phase != "tests":  # the program half's own messages are small: garbage
            return self._report("garbled", phase=phase)
        return self._report("bad_return", phase=phase, too_costly=str(exc))

    def __call__(self, *args, **kwargs):
        if self._clock is not None and self._clock.expired:  # a test swallowed _OutOfTime
            raise _Abort(self._report("timeout", phase="tests", judge_clock=True))
        with _Clock.paused():
            try:
                return self._call(args, kwargs)
            except _Abort as abort:  # kept: the clock may stop the tests while this unwinds
                self.aborted = abort.report
                raise

    def _call(self, args: tuple, kwargs: dict):
        shown = [_short.repr(a) for a in args] + [
            f"{k}={_short.repr(v)}" for k, v in kwargs.items()
        ]
        self.last_call = f"{self.__name__}({', '.join(shown)})"
        self.last_result = None
        self.calls += 1
        try:  # trusted values from the tests; only the sandbox reads this
            request = wire.frame(marshal.dumps((args, kwargs)))
        except (ValueError, wire.WireError) as exc:
            raise TypeError(f"the judge cannot send this argument to the sandbox: {exc}") from None
        try:
            self._process.send(request)
        except TimeoutError:
            raise _Abort(self._report("timeout", phase="tests")) from None
        except SandboxClosed:
            raise _Abort(self._report("died", phase="tests")) from None
        budget = wire.Budget()  # one for the whole reply: parsing, decoding, building its sets
        reply = self.receive("tests", budget)
        kind = reply.get("kind")
        if kind == "returned":
            try:
                value = wire.decode(reply.get("value"), budget)
            except wire.WireTooLarge as exc:
                raise _Abort(self._too_costly(exc, "tests")) from None
            except (wire.WireError, RecursionError):
                raise _Abort(self._report("garbled", phase="tests")) from None
            self.last_result = _short.repr(value)
            return value
        if kind == "raised":
            name = valid_text(str(reply.get("error_type"))[:100])
            message = valid_text(str(reply.get("message", ""))[:2000])
            lineno = reply.get("lineno") if type(reply.get("lineno")) is int else None
            if name in _FATAL:
                raise _Abort(
                    self._report(
                        "error", phase="tests", error_type=name, message=message, in_response=True
                    )
                )
            raise _raised(name, message, lineno)
        if kind == "bad_return":
            why = str(reply.get("why", ""))
            raise _Abort(
                self._report(
                    "bad_return",
                    phase="tests",
                    return_type=str(reply.get("type"))[:100],
                    why=why[:200],
                    too_large="larger than" in why,
                )
            )
        raise _Abort(self._report("garbled", phase="tests"))


@functools.lru_cache(maxsize=2048)
def _compiled(name: str, source: str):
    return compile(source, name, "exec")


def _fresh_module(name: str):
    spec = importlib.util.find_spec(name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _private_builtins() -> dict:
    """Builtins for one run of the tests: ``import random`` gives a module of their own."""
    private: dict[str, object] = {}
    real_import = builtins.__import__

    def judge_import(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "random" and level == 0:
            if "random" not in private:
                private["random"] = _fresh_module("random")
            return private["random"]
        return real_import(name, globals, locals, fromlist, level)

    table = dict(builtins.__dict__)
    table["__import__"] = judge_import
    return table


def run_judged(
    response_chunks: list[tuple[str, str]],
    trusted_chunks: list[tuple[str, str]],
    *,
    entry_point: str,
    check: str | None = None,
    limits: SandboxLimits | None = None,
) -> TestOutcome:
    """Run the response's code (``response_chunks``, (name, source) pairs) in the sandbox and the
    tests (``trusted_chunks``, executed in order in one namespace of the judge) here.

    In that namespace ``entry_point`` is the :class:`Candidate`; with ``check``, the tests define a
    function that is then called with it (HumanEval's ``check(candidate)``), otherwise they are
    top-level asserts. Reward-relevant: the outcome passes only if every test ran here and passed.
    """
    limits = limits or SandboxLimits()
    try:
        process = SandboxProcess(
            SERVER_SOURCE,
            files={
                "wire.py": WIRE_SOURCE,
                "response.marshal": marshal.dumps((response_chunks, entry_point)),
            },
            limits=limits,
        )
    except OSError as exc:
        return sandbox_error(exc, "judge")
    with process:
        clock = _Clock(process.deadline, {name for name, _ in trusted_chunks})
        candidate = Candidate(process, entry_point, clock)
        try:
            with clock:
                report = _judge(candidate, trusted_chunks, entry_point, check)
        except _OutOfTime:  # at the edges of _judge, outside its own handler
            pass
        if candidate.aborted is not None:  # even if a bare `except:` in a test went on
            report = candidate.aborted
        elif clock.expired:
            report = candidate._report("timeout", phase="tests", judge_clock=True)
        result = process.finish(wait=report["status"] == "died")
    outcome = outcome_from_report(report, result, entry_point, limits)
    outcome.info["mode"] = "judge"
    return outcome


def _judge(
    candidate: Candidate,
    trusted_chunks: list[tuple[str, str]],
    entry_point: str,
    check: str | None,
) -> dict:
    sources = {name: source.splitlines() for name, source in trusted_chunks}
    namespace: dict[str, object] = {"__name__": "__judge__", "__builtins__": _private_builtins()}
    try:
        hello = candidate.receive("response")
        if hello.get("kind") == "error":
            lineno = hello.get("lineno")
            return candidate._report(
                "error",
                phase="response",
                error_type=str(hello.get("error_type"))[:100],
                message=str(hello.get("message", ""))[:2000],
                lineno=lineno if type(lineno) is int else None,
            )
        if hello.get("kind") != "ready":
            return candidate._report("garbled", phase="response")
        if hello.get("callable") is not True:
            return candidate._report("missing_entry_point")
        for name, source in trusted_chunks:
            namespace[entry_point] = candidate  # over the prompt's stub; top-level tests call it
            exec(_compiled(name, source), namespace)
        namespace[entry_point] = candidate
        if check is not None:
            test: Callable = namespace[check]  # type: ignore[assignment]
            test(candidate)
    except _Abort as abort:
        return abort.report
    except _OutOfTime:
        return candidate.aborted or candidate._report("timeout", phase="tests", judge_clock=True)
    except BaseException as exc:
        return _test_failure(candidate, exc, sources)
    return candidate._report("passed")


def _test_failure(candidate: Candidate, exc: BaseException, sources: dict) -> dict:
    frames = traceback.extract_tb(exc.__traceback__)
    line = ""
    test_frames = [f for f in frames if f.filename in sources]
    if test_frames:
        where = test_frames[-1]
        lines = sources[where.filename]
        if where.lineno and 0 < where.lineno <= len(lines):
            line = lines[where.lineno - 1].strip()
    in_response = isinstance(exc, CandidateRaised)
    try:
        message = str(exc)
    except Exception:
        message = "<unprintable>"
    status = "assertion" if isinstance(exc, AssertionError) and not in_response else "error"
    return candidate._report(
        status,
        phase="tests",
        error_type=exc.error_type if in_response else type(exc).__name__,
        message=message[:2000],
        test_line=line,
        in_response=in_response,
        lineno=exc.lineno if in_response else None,
    )
