"""Test driver that runs *inside* the sandbox (read as text by ``harness.py``; never imported).

It executes the response's code, then the trusted test code, in one namespace, and writes one JSON
report to the report pipe. A pass is only reported after every test finished, with a nonce read from
the secret pipe at that moment, then the process ends with ``os._exit`` so no hook of the response
(``atexit``, ``__del__``) runs afterwards. Everything the driver relies on is bound to locals before
the response runs. Between the response and the tests, after every call of the entry point, and before
a pass, it checks that builtins, the usual stdlib modules the tests use and trace/profile hooks were
not tampered with and that no response thread is still running; a call of the entry point may not
rebind globals other than the response's own, and must return plain data (no object whose ``__eq__``
always says yes).
"""

import bisect
import builtins
import collections
import copy
import functools
import hashlib
import heapq
import itertools
import json
import math
import operator
import os
import random
import re
import reprlib
import signal
import string
import sys
import traceback
import typing

WATCHED_MODULES = (
    bisect,
    collections,
    copy,
    functools,
    hashlib,
    heapq,
    itertools,
    math,
    operator,
    random,
    re,
    string,
    typing,
)
PLAIN_ATOMS = (int, float, complex, str, bytes, bool, type(None))
PLAIN_CONTAINERS = (list, tuple, set, frozenset)


class _Deadline(BaseException):
    """Raised by the alarm shortly before the sandbox's wall-clock limit."""


def main() -> None:
    write, read, exit_now = os.write, os.read, os._exit
    dumps, extract_tb = json.dumps, traceback.extract_tb
    gettrace, getprofile, current_frames = sys.gettrace, sys.getprofile, sys._current_frames
    modules_table = sys.modules
    secret_fd, report_fd = int(sys.argv[-2]), int(sys.argv[-1])
    payload = json.loads(__files__["payload.json"])  # noqa: F821 (in memory, from the sandbox)
    os.remove("payload.json")

    builtins_dict = builtins.__dict__
    pristine_builtins = dict(builtins_dict)
    pristine_modules = {m.__name__: (m, dict(vars(m))) for m in WATCHED_MODULES}
    short = reprlib.Repr()
    short.maxstring = short.maxother = 80
    short.maxlist = short.maxtuple = short.maxset = short.maxdict = 10
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    sources = {chunk["name"]: chunk["source"].splitlines() for chunk in payload["tests"]}
    entry_point = payload.get("entry_point")
    last = {"call": None, "result": None, "calls": 0}
    response_names: set[str] = set()

    flush = sys.stdout.flush

    def report(status: str, **fields) -> None:
        try:  # noqa: SIM105 (bound before the response runs)
            flush()
        except BaseException:
            pass
        fields.update(status=status, calls=last["calls"], last_call=last["call"])
        fields.setdefault("last_result", last["result"])
        write(report_fd, dumps(fields).encode())
        exit_now(0 if status == "passed" else 1)

    def unchanged(current: dict, reference: dict) -> bool:
        missing = object()
        return all(current.get(key, missing) is value for key, value in reference.items())

    def tampering() -> str | None:
        if gettrace() is not None or getprofile() is not None:
            return "installed a trace or profile hook"
        if namespace.get("__builtins__") not in (builtins, builtins_dict):
            return "replaced __builtins__"
        if not unchanged(builtins_dict, pristine_builtins):
            return "modified builtins"
        for name, (module, attrs) in pristine_modules.items():
            if modules_table.get(name) is not module or not unchanged(vars(module), attrs):
                return f"modified the {name} module"
        if len(current_frames()) > 1:
            return "left threads running"
        return None

    def rebinding(before: dict) -> str | None:
        """A call may rebind only the response's own globals, and not shadow a builtin."""
        missing = object()
        for name, value in before.items():
            if name not in response_names and namespace.get(name, missing) is not value:
                return f"rebound the global {name!r}"
        for name in namespace.keys() - before.keys():
            if name in builtins_dict:
                return f"shadowed the builtin {name!r}"
        return None

    def plain(value: object) -> bool:
        stack = [value]
        while stack:
            item = stack.pop()
            kind = type(item)
            if kind in PLAIN_ATOMS:
                continue
            if kind in PLAIN_CONTAINERS:
                stack.extend(item)
            elif kind is dict:
                stack.extend(item.keys())
                stack.extend(item.values())
            else:
                return False
        return True

    def describe_error(exc: BaseException) -> tuple[str, str]:
        try:
            message = str(exc)
        except BaseException:
            message = "<unprintable>"
        return type(exc).__name__, message[:2000]

    def guard(function):
        def guarded(*args, **kwargs):
            shown = [short.repr(a) for a in args] + [
                f"{k}={short.repr(v)}" for k, v in kwargs.items()
            ]
            last["call"] = f"{entry_point}({', '.join(shown)})"
            last["result"] = None
            last["calls"] += 1
            before = dict(namespace)
            result = function(*args, **kwargs)
            problem = tampering() or rebinding(before)
            if problem is not None:
                report("tampered", problem=problem)
            if not plain(result):
                report("bad_return", return_type=type(result).__name__)
            last["result"] = short.repr(result)
            return result

        return guarded

    def on_alarm(signum, frame):
        raise _Deadline

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, payload["deadline_s"])

    for chunk in payload["response"]:
        try:
            exec(compile(chunk["source"], chunk["name"], "exec"), namespace)
        except _Deadline:
            report("timeout", phase="response")
        except SyntaxError as exc:
            report(
                "error",
                phase="response",
                error_type="SyntaxError",
                message=exc.msg,
                lineno=exc.lineno,
            )
        except BaseException as exc:
            error_type, message = describe_error(exc)
            frames = [f for f in extract_tb(exc.__traceback__) if f.filename == chunk["name"]]
            lineno = frames[-1].lineno if frames else None
            report("error", phase="response", error_type=error_type, message=message, lineno=lineno)

    problem = tampering()
    if problem is not None:
        report("tampered", problem=problem)
    if entry_point is not None:
        if not callable(namespace.get(entry_point)):
            report("missing_entry_point")
        namespace[entry_point] = guard(namespace[entry_point])
    response_names.update(namespace.keys() - {entry_point, "__builtins__", "__name__"})

    try:
        for chunk in payload["tests"]:
            exec(compile(chunk["source"], chunk["name"], "exec"), namespace)
        if payload.get("check"):
            namespace[payload["check"]](namespace[entry_point])
    except _Deadline:
        report("timeout", phase="tests")
    except BaseException as exc:
        error_type, message = describe_error(exc)
        frames = extract_tb(exc.__traceback__)
        test_frames = [f for f in frames if f.filename in sources]
        line = ""
        if test_frames:
            where = test_frames[-1]
            lines = sources[where.filename]
            if where.lineno and 0 < where.lineno <= len(lines):
                line = lines[where.lineno - 1].strip()
        in_response = bool(frames) and frames[-1].filename not in sources
        status = "assertion" if isinstance(exc, AssertionError) and not in_response else "error"
        report(
            status,
            phase="tests",
            error_type=error_type,
            message=message,
            test_line=line,
            in_response=in_response,
        )

    signal.setitimer(signal.ITIMER_REAL, 0)
    problem = tampering()
    if problem is not None:
        report("tampered", problem=problem)
    nonce = read(secret_fd, 4096).decode("ascii", errors="replace")
    report("passed", nonce=nonce)


main()
