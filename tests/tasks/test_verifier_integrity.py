"""Verifier integrity: hostile responses cannot earn a reward they did not earn (issue 14).

One test per attack class, through the tasks' public API: tampering with concurrent runs under
``verify_many``, shadowing the helpers or builtins a check uses, forging the verdict through file
descriptors or introspection, filling the disk, and the plain-data boundary of the judge. The
sandbox-level attacks (host files, network, surviving processes) are in ``test_sandbox.py``.
"""

from __future__ import annotations

import json
import math
import random

import pytest

from vpd_lightning.tasks import HumanEvalTask, JsonlTask, verify_many
from vpd_lightning.tasks.sandbox import wire
from vpd_lightning.tasks.sandbox.judge import run_judged
from vpd_lightning.tasks.sandbox.runner import SandboxLimits

from .helpers import isolated_only


@pytest.fixture(scope="module")
def task() -> HumanEvalTask:
    return HumanEvalTask(timeout_s=5.0, memory_mb=1024)


@pytest.fixture(scope="module")
def problems(task) -> dict[str, dict]:
    return {p["id"]: p for p in task.problems()}


def fenced(code: str) -> str:
    return f"```python\n{code}\n```"


def canonical(record: dict) -> str:
    return fenced(record["code_prompt"] + record["canonical_solution"])


WRONG_0 = "def has_close_elements(numbers, threshold):\n    return True\n"

# -- 1. other runs of the same batch ----------------------------------------------------------

# Runs for 2.5 s looking for other runs (their temp dirs next to its own working directory, their
# processes) and rewrites their test payloads: `tests` replaced by `TESTS`; with KILL it also kills
# the processes of other runs. Then it answers its own problem correctly.
_TAMPER = """
import glob, json, os, signal, time
TESTS, KILL = {tests!r}, {kill!r}
here = os.getcwd()
parent = os.path.dirname(here)
end = time.monotonic() + 2.5
while time.monotonic() < end:
    for path in glob.glob(os.path.join(parent, '*', 'payload.json')):
        if path.startswith(here + '/'):
            continue
        try:
            with open(path) as handle:
                data = json.load(handle)
            if data.get('tests') != TESTS:
                data['tests'], data['check'] = TESTS, None
                with open(path, 'w') as handle:
                    json.dump(data, handle)
        except Exception:
            pass
    if KILL:
        for pid in filter(str.isdigit, os.listdir('/proc')):
            try:
                cwd = os.readlink(f'/proc/{{pid}}/cwd')
                if cwd != here and os.path.dirname(cwd) == parent and int(pid) != os.getpid():
                    os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass
    time.sleep(0.001)
"""


def _batch(problems: dict, attacker_code: str, victim: str) -> list[float]:
    task = HumanEvalTask(timeout_s=6.0, memory_mb=1024)
    record = problems["HumanEval/0"]
    attacker = fenced(attacker_code + record["code_prompt"] + record["canonical_solution"])
    verdicts = verify_many(task, [record] * 8, [attacker] + [victim] * 7, workers=4)
    assert verdicts[0].reward == 1.0, verdicts[0].feedback  # the attacker itself was right
    return [v.reward for v in verdicts[1:]]


def test_a_run_cannot_make_other_runs_wrong_answers_pass(problems):
    tamper = _TAMPER.format(tests=[], kill=False)
    assert _batch(problems, tamper, fenced(WRONG_0)) == [0.0] * 7


def test_a_run_cannot_make_other_runs_right_answers_fail(problems):
    tamper = _TAMPER.format(tests=["raise AssertionError('sabotaged')"], kill=True)
    assert _batch(problems, tamper, canonical(problems["HumanEval/0"])) == [1.0] * 7


# -- 2. helpers and builtins the checks use ---------------------------------------------------

SHADOWING = {
    # HumanEval/32's check computes poly(coeffs, solution) with the prompt's helper
    "HumanEval/32": "def poly(xs, x):\n    return 0.0\ndef find_zero(xs):\n    return 0.0\n",
    # /38 and /50 encode with the prompt's helper, then decode with the candidate
    "HumanEval/38": "def encode_cyclic(s):\n    return s\ndef decode_cyclic(s):\n    return s\n",
    "HumanEval/50": "def encode_shift(s):\n    return s\ndef decode_shift(s):\n    return s\n",
    # /2 checks abs(candidate(3.5) - 0.5) < 1e-6
    "HumanEval/2": "def abs(x):\n    return 0\ndef truncate_number(number):\n    return 7.0\n",
    # /37 compares tuple(candidate(...)) == tuple(...)
    "HumanEval/37": (
        "class tuple:\n    def __init__(self, *a):\n        pass\n"
        "    def __eq__(self, other):\n        return True\n"
        "def sort_even(l):\n    return l\n"
    ),
}


@pytest.mark.parametrize("problem", sorted(SHADOWING))
def test_redefining_a_helper_or_builtin_of_the_check_earns_nothing(task, problems, problem):
    verdict = task.verify(problems[problem], fenced(SHADOWING[problem]))
    assert verdict.reward == 0.0, verdict.feedback
    assert verdict.feedback.startswith(("Test failed: ", "The tests raised")), verdict.feedback
    assert verdict.info["mode"] == "judge"


# -- 3. forging the verdict from inside the process -------------------------------------------

FORGERIES = {
    # the report pipe is the last argv number, the secret (nonce) pipe the one before
    "file_descriptors": (
        "import json, os, sys\n"
        "fds = [int(a) for a in sys.argv if a.isdigit()]\n"
        "os.set_blocking(fds[-2], False)\n"
        "try:\n    nonce = os.read(fds[-2], 4096).decode()\n"
        "except BlockingIOError:\n    nonce = ''\n"
        "report = json.dumps({'status': 'passed', 'nonce': nonce}).encode()\n"
        "for fd in map(int, os.listdir('/proc/self/fd')):\n"
        "    try:\n        os.write(fd, report)\n"
        "    except OSError:\n        pass\n"
        "os._exit(0)\n"
    ),
    "frames": (
        "import os, sys\n"
        "frame = sys._getframe()\n"
        "while frame is not None:\n"
        "    scope = frame.f_locals\n"
        "    if 'report' in scope and 'secret_fd' in scope:\n"
        "        scope['report']('passed', nonce=os.read(scope['secret_fd'], 4096).decode())\n"
        "    frame = frame.f_back\n" + WRONG_0
    ),
    "gc": (
        "import gc, os, sys\n"
        "for thing in gc.get_objects():\n"
        "    if getattr(thing, '__name__', '') == 'report' and callable(thing):\n"
        "        thing('passed', nonce=os.read(int(sys.argv[-2]), 4096).decode())\n" + WRONG_0
    ),
    "fake_replies": (
        "import os, struct, sys\n"
        "def frame(text):\n"
        "    return struct.pack('>I', len(text)) + text.encode()\n"
        "out = int(sys.argv[-1])\n"
        'os.write(out, frame(\'{"kind": "ready", "callable": true}\'))\n'
        "for answer in ('true', 'false') * 20:\n"
        '    os.write(out, frame(\'{"kind": "returned", "value": %s}\' % answer))\n'
        'os.write(out, frame(\'{"status": "passed"}\'))\n' + WRONG_0
    ),
}


@pytest.mark.parametrize("attack", sorted(FORGERIES))
def test_the_verdict_cannot_be_forged_from_inside(task, problems, attack):
    verdict = task.verify(problems["HumanEval/0"], fenced(FORGERIES[attack]))
    assert verdict.reward == 0.0, verdict.feedback


# -- 4. filling the disk ----------------------------------------------------------------------

FILL = (
    "import os\n"
    "written = 0\n"
    "try:\n"
    "    for i in range(100):\n"
    "        with open(f'fill{i}', 'wb') as handle:\n"
    "            handle.write(b'x' * 1024 * 1024)\n"
    "        written += 1\n"
    "except OSError:\n"
    "    pass\n"
    "print('written_mb', written)\n"
)


@isolated_only
def test_a_full_scratch_fails_only_its_own_run(problems):
    task = HumanEvalTask(timeout_s=5.0, memory_mb=1024)
    task.limits = SandboxLimits(**{**vars(task.limits), "scratch_mb": 8})
    record = problems["HumanEval/0"]
    filled = task.verify(record, fenced(FILL + WRONG_0))
    assert filled.reward == 0.0
    written = int(filled.info["output"].split("written_mb")[1].split()[0])
    assert written <= 8, filled.info["output"]  # its scratch, not the host's disk
    assert task.verify(record, canonical(record)).reward == 1.0  # and no OSError


# -- 5. the plain-data boundary ---------------------------------------------------------------


def test_only_plain_data_comes_back(task, problems):
    record = problems["HumanEval/0"]
    cases = {
        "class Yes:\n    def __eq__(self, other):\n        return True\n": "Yes()",
        "class B(int):\n    def __eq__(self, other):\n        return True\n": "B(1)",
        "": "[object()]",
    }
    for prelude, value in cases.items():
        code = prelude + f"def has_close_elements(numbers, threshold):\n    return {value}\n"
        verdict = task.verify(record, fenced(code))
        assert verdict.reward == 0.0 and "the tests need plain values" in verdict.feedback


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        0,
        -(2**5000),
        1.5,
        -0.0,
        math.inf,
        -math.inf,
        "é\udc80\x00",
        b"\x00\xff",
        1 + 2j,
        [1, [2.5, "a"]],
        (1, (2,)),
        {1: "a", (2, 3): [4], "k": {"n": None}},
        {1, "x", (2,)},
        frozenset({3}),
    ],
)
def test_wire_round_trip(value):
    back = wire.loads(wire.dump(value))
    assert type(back) is type(value) and back == value and repr(back) == repr(value)
    body = wire.unpack(wire.message(kind="returned", value=value)[wire.HEADER_SIZE :])
    assert repr(wire.decode(body["value"])) == repr(value)


def test_wire_nan_and_rejections():
    assert math.isnan(wire.loads(wire.dump(math.nan)))
    for bad in ([{"set": [[1]]}], {"dict": [[[1], 2]]}, {"evil": 1}, {"a": 1, "b": 2}):
        with pytest.raises(wire.WireError):
            wire.decode(bad)
    with pytest.raises(wire.WireError):
        wire.dump(object())
    with pytest.raises(wire.WireError):
        wire.dump(type("S", (str,), {})("x"))
    deep: list = []
    for _ in range(wire.MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(wire.WireError):
        wire.dump(deep)
    with pytest.raises(wire.WireError):
        wire.unpack(b"NaN")
    with pytest.raises(wire.WireError):
        wire.unpack(b"[" * 100_000)


def test_values_cross_exactly():
    code = (
        "def f(kind):\n"
        "    return {'nan': float('nan'), 'tuple': (1, [2]), 'dict': {(1, 2): {3}},\n"
        "            'bytes': b'ab', 'inf': float('-inf'), 'big': 3 ** 9000}[kind]\n"
    )
    tests = (
        "import math\n"
        "assert math.isnan(f('nan'))\n"
        "assert f('tuple') == (1, [2]) and type(f('tuple')) is tuple\n"
        "assert f('dict') == {(1, 2): {3}}\n"
        "assert f('bytes').decode() == 'ab'\n"
        "assert f('inf') == -math.inf\n"
        "assert f('big') == 3 ** 9000\n"
    )
    outcome = run_judged([("<response>", code)], [("<tests>", tests)], entry_point="f")
    assert outcome.passed, outcome.feedback


def test_exceptions_cross_by_name_and_tests_may_expect_them():
    code = "def f(x):\n    if x < 0:\n        raise ValueError('negative')\n    return x\n"
    tests = (
        "try:\n    f(-1)\n    raise AssertionError('no error')\n"
        "except ValueError as exc:\n    assert 'negative' in str(exc)\n"
        "assert f(2) == 2\n"
    )
    assert run_judged([("<response>", code)], [("<tests>", tests)], entry_point="f").passed
    failing = run_judged(
        [("<response>", code)], [("<tests>", "assert f(-3) == 3")], entry_point="f"
    )
    assert not failing.passed
    assert failing.feedback == "f(-3) raised ValueError: negative (line 3 of the code)."


def test_the_checks_do_not_touch_the_trainers_random_state(task, problems):
    random.seed(1234)
    expected = [random.random() for _ in range(3)]
    random.seed(1234)
    records = [problems[p] for p in ("HumanEval/32", "HumanEval/38", "HumanEval/53")]
    verdicts = verify_many(task, records, [canonical(r) for r in records], workers=3)
    assert [v.reward for v in verdicts] == [1.0] * 3
    assert [random.random() for _ in range(3)] == expected


# -- JSONL code tasks --------------------------------------------------------------------------


@pytest.fixture
def jsonl(tmp_path) -> JsonlTask:
    rows = [
        {"prompt": "Write square(x).", "entry_point": "square", "tests": "assert square(3) == 9"},
        {"prompt": "Write cube(x).", "tests": "assert cube(2) == 8"},
    ]
    (tmp_path / "code.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 5))
    return JsonlTask(path=str(tmp_path / "code.jsonl"), timeout_s=3.0)


def test_jsonl_tests_with_an_entry_point_run_in_the_judge(jsonl):
    square = {"prompt": "q", "entry_point": "square", "tests": "assert abs(square(3)) == 9"}
    assert jsonl.verify(square, "def square(x):\n    return x * x").info["mode"] == "judge"
    for cheat in (
        "def abs(x):\n    return 9\ndef square(x):\n    return 0\n",
        FORGERIES["file_descriptors"],
        FORGERIES["frames"].replace(WRONG_0, "def square(x):\n    return 0\n"),
    ):
        verdict = jsonl.verify(square, cheat)
        assert verdict.reward == 0.0, verdict.feedback


def test_jsonl_tests_without_an_entry_point_run_in_the_named_weaker_mode(jsonl):
    cube = {"prompt": "q", "tests": "assert cube(2) == 8"}
    verdict = jsonl.verify(cube, "def cube(x):\n    return x ** 3")
    assert verdict.reward == 1.0 and verdict.info["mode"] == "script"
    assert jsonl.verify(cube, "def cube(x):\n    return 0").reward == 0.0
