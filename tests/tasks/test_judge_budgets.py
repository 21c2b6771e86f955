"""The trusted judge bounds its own work on whatever the sandbox sends (issue 21, the judge side).

Each test is an attack that got the judge stuck, crashed a run or earned a wrong reward before:
values that are quadratic or huge to decode, text that is not valid Unicode, a candidate's
exception that steers the tests' loops, answers too long for ``str``, names that grow a cache, and
trusted test code kept busy past the run's deadline by what the candidate returned.
"""

from __future__ import annotations

import sys
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import pytest

from vpd_lightning.tasks.sandbox import judge, wire
from vpd_lightning.tasks.sandbox.judge import run_judged
from vpd_lightning.tasks.sandbox.runner import SandboxLimits

P = 2**61 - 1  # hash(i * P) == 0 for every int i
LIMITS = SandboxLimits.for_tests(3.0, 1024, True)


def judged(code: str, tests: str, entry_point: str = "f", limits: SandboxLimits = LIMITS):
    start = time.monotonic()
    outcome = run_judged(
        [("<response>", code)], [("<tests>", tests)], entry_point=entry_point, limits=limits
    )
    return outcome, time.monotonic() - start


# The response writes the judge's messages itself (a "ready", then the reply to the first call):
# whatever the program half would do, these bytes are what the judge has to decode.
FORGED_REPLY = """
import os, struct, sys
def frame(text):
    return struct.pack('>I', len(text)) + text.encode()
out = int(sys.argv[-1])
os.write(out, frame('{{"kind": "ready", "callable": true}}'))
os.write(out, frame('{{"kind": "returned", "value": ' + {value} + '}}'))
def f():
    return 0
"""

COLLIDING = {
    "set": f"'{{\"set\":[' + ','.join(str(i * {P}) for i in range(40000)) + ']}}'",
    "dict": f"'{{\"dict\":[' + ','.join('[%d,0]' % (i * {P}) for i in range(40000)) + ']}}'",
}


@pytest.mark.parametrize("kind", sorted(COLLIDING))
def test_a_set_or_dict_of_colliding_hashes_is_refused_before_it_is_built(kind):
    # Before: 14 s (set) or 21 s (dict) in wire.decode holding the GIL, past the 3 s timeout.
    outcome, elapsed = judged(FORGED_REPLY.format(value=COLLIDING[kind]), "assert f() == 0")
    assert not outcome.passed
    assert "too costly to check" in outcome.feedback and "hashes collide" in outcome.feedback
    assert elapsed < 2.5, f"{elapsed:.1f} s"


def test_collision_budget_is_checked_before_the_set_is_built():
    data = {"set": [i * P for i in range(40000)]}
    start = time.monotonic()
    with pytest.raises(wire.WireTooLarge, match="hashes collide"):
        wire.decode(data)
    assert time.monotonic() - start < 0.5
    # a few colliding members (hash(-1) == hash(-2)) and large plain sets decode as before
    assert wire.decode({"set": [-1, -2, 3 * P, 4 * P]}) == {-1, -2, 3 * P, 4 * P}
    assert len(wire.decode({"set": list(range(200_000))})) == 200_000
    pairs = [[{"tuple": [1, 2]}, "a"], [-1, 0], [-2, 1]]
    assert wire.decode({"dict": pairs}) == {(1, 2): "a", -1: 0, -2: 1}
    # big members that collide: the work counts their size, not just their number
    big = [{"tuple": [i * P, *range(5000)]} for i in range(30)]
    with pytest.raises(wire.WireTooLarge):
        wire.decode({"frozenset": big})


def test_a_list_of_colliding_values_is_charged_for_the_set_the_tests_may_make_of_it():
    # Before: a list of 40,000 colliding ints decoded freely, and `set(f())` in the trusted tests
    # then held the GIL for 9.4 s in one C call, past the 3 s deadline (0.7 s for 10,000: n**2).
    response = "def f():\n    return [i * (2**61 - 1) for i in range(40000)]\n"
    outcome, elapsed = judged(response, "assert set(f()) == {0}")
    assert not outcome.passed
    assert "too costly to check" in outcome.feedback and "hashes collide" in outcome.feedback
    assert elapsed < 2.5, f"{elapsed:.1f} s"
    with pytest.raises(wire.WireTooLarge, match="hashes collide"):  # tuples, and tuples of them
        wire.decode({"tuple": [i * P for i in range(2000)]})
    with pytest.raises(wire.WireTooLarge, match="hashes collide"):
        wire.decode([{"tuple": [i * P, 0]} for i in range(2000)])
    with pytest.raises(wire.WireTooLarge, match="hashes collide"):  # a dict's value
        wire.decode({"dict": [["a", [i * P for i in range(2000)]]]})


def test_honest_lists_with_repeats_or_a_few_collisions_decode_as_before():
    start = time.monotonic()
    assert wire.decode([0] * 480_000) == [0] * 480_000  # one object repeated
    assert len(wire.decode(list(range(300_000)))) == 300_000  # distinct hashes
    pairs = [{"tuple": [i, i + 1]} for i in range(100_000)]
    assert wire.decode(pairs)[-1] == (99_999, 100_000)
    big = 7**300  # equal values decoded as separate objects: one distinct value
    assert wire.loads("[" + ",".join([str(big)] * 50_000) + "]") == [big] * 50_000
    mixed = [-1, -2, 1, True, 1.0, 3 * P, 4 * P, (1, 2), frozenset({-1, -2})] * 100
    assert wire.loads(wire.dump(mixed)) == mixed
    assert time.monotonic() - start < 3.0


def nested_sets(sets: int, members: int) -> str:
    """JSON of a set of ``sets`` frozensets of ``members`` + 1 colliding ints, alike but for one
    member: each frozenset fits a per-set budget, but comparing two costs about members**2 / 4."""
    inner = (
        '{"frozenset":[' + ",".join(str(i * P) for i in [*range(members), members + j]) + "]}"
        for j in range(sets)
    )
    return '{"set":[' + ",".join(inner) + "]}"


def test_sets_of_sets_of_colliding_values_are_charged_for_comparing_them():
    # Before: 4.7 s building the outer set of 36 (1.2 MB) in one C call, each inner set within
    # its own budget; the work is now charged to one budget for the whole message.
    start = time.monotonic()
    with pytest.raises(wire.WireTooLarge, match=r"hashes collide.*a message may cost"):
        wire.loads(nested_sets(36, 1400))
    assert time.monotonic() - start < 0.5
    # two inner sets that each fit the budget alone do not fit it together
    wire.loads(nested_sets(1, 1000))
    with pytest.raises(wire.WireTooLarge):
        wire.loads(nested_sets(2, 1000))
    # honest nested values decode as before
    honest = {frozenset(range(i, i + 10)) for i in range(1000)} | {frozenset({-1, -2})}
    assert wire.loads(wire.dump(honest)) == honest
    pairs = {(i, frozenset({-1, -2, i})): [i] for i in range(1000)}
    assert wire.loads(wire.dump(pairs)) == pairs


def test_long_colliding_ints_are_charged_for_their_length():
    # Before: 1,400 ints of 45,000 bits that hash alike and differ only in their low digits
    # (15.8 MB) took 2.5 s in one C call, charged as if they were small.
    top = 1 << 40_000
    members = ",".join(wire.dump((top + j) * P) for j in range(1000))  # {"int": "0x..."}
    start = time.monotonic()
    with pytest.raises(wire.WireTooLarge, match="hashes collide"):
        wire.loads('{"set":[' + members + "]}")
    assert time.monotonic() - start < 1.0
    honest = {7**20000 + j for j in range(1000)}  # long but distinct hashes: no comparisons
    assert wire.loads(wire.dump(honest)) == honest


# nested_sets(36, 1400) written by the response itself (small source: the hostile run starts as
# fast as its neighbour, so its reply arrives while the neighbour is still being checked)
NESTED_IN_SANDBOX = (
    "'{\"set\":[' + ','.join('{\"frozenset\":[' + ','.join(str(i * P) for i in "
    "[*range(1400), 1400 + j]) + ']}' for j in range(36)) + ']}'"
).replace("P", str(P))


def test_a_hostile_reply_cannot_change_a_neighbours_reward_or_stall_the_step():
    # Before: the neighbour (a right answer verified beside it, busy for 1.6 s of its 3 s) timed
    # out, reward 0, while the judge built the hostile reply's set for 5 s holding the GIL.
    limits = SandboxLimits.for_tests(3.0, 1024, True)
    honest = (
        "import time\ndef f(x):\n    time.sleep(0.4)\n    return x + 1\n",
        "\n".join(f"assert f({i}) == {i + 1}" for i in range(4)),
    )
    hostile = (FORGED_REPLY.format(value=NESTED_IN_SANDBOX), "assert f() == 0")
    alone = judged(*honest, limits=limits)[1]  # this machine's time for the neighbour, now
    with ThreadPoolExecutor(2) as pool:
        bad, good = (pool.submit(judged, *pair, limits=limits) for pair in (hostile, honest))
        (bad, bad_s), (good, good_s) = bad.result(), good.result()
    assert good.passed, good.feedback
    assert not bad.passed and "too costly to check" in bad.feedback
    assert max(bad_s, good_s) < alone + 1.0, (alone, bad_s, good_s)


def test_a_16_mb_string_of_backslashes_costs_the_judge_little():
    # Before: 13 s and 940 MB in the backtracking value-count regex, for an honest string.
    text = "\\" * (8 * 1024 * 1024 - 20)
    body = b'{"kind":"returned","value":' + wire.dump(text).encode() + b"}"
    assert len(body) <= wire.MAX_MESSAGE
    tracemalloc.start()
    start = time.monotonic()
    try:
        assert wire.unpack(body)["value"] == text
        elapsed, peak = time.monotonic() - start, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 2.0 and peak < 3 * len(body), (elapsed, peak)
    assert wire.count_values(body, limit=10) == 5  # the string's marks are not counted


def test_a_16_mb_message_of_nested_lists_is_refused_before_it_is_parsed():
    # Before: 11 s of judge CPU and about 800 MB of memory for each concurrent check.
    body = b'{"kind":"returned","value":[' + b",".join([b"[]"] * 5_500_000) + b"]}"
    assert len(body) <= wire.MAX_MESSAGE
    tracemalloc.start()
    start = time.monotonic()
    try:
        with pytest.raises(wire.WireTooLarge, match="a message of more than 1000000 values"):
            wire.unpack(body)
        elapsed, peak = time.monotonic() - start, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0 and peak < 3 * len(body), (elapsed, peak)


def test_a_value_of_too_many_items_gets_a_reward_of_0_and_says_why():
    outcome, elapsed = judged("def f():\n    return [[]] * 1_200_000\n", "assert f() == []")
    assert not outcome.passed and elapsed < 3.0
    assert outcome.feedback.startswith("f() returned a value too costly to check: a message of")


@pytest.mark.parametrize(
    "text",
    ['"[[[,,,:::{{{"', '"a\\\\"', '"\\"[,"', '"\\u005b"', "[1, [2, 3], {}]", '{"a": [1, 2]}'],
)
def test_the_value_count_is_an_upper_bound_that_ignores_strings(text):
    import json

    def values(node) -> int:
        if isinstance(node, list):
            return 1 + sum(map(values, node))
        if isinstance(node, dict):
            return 1 + sum(1 + values(v) for v in node.values())
        return 1

    assert values(json.loads(text)) <= wire.count_values(text.encode())
    if text.startswith('"'):  # brackets, commas and escaped quotes inside a string are not values
        assert wire.count_values(text.encode(), limit=1) == 1


def test_counting_values_is_linear_even_for_strings_that_never_close():
    body = b'{"v":["' + b'\\"' * 2_000_000 + b"]}"  # 4 MB: each quote starts a string to the end
    start = time.monotonic()
    with pytest.raises(wire.WireError):
        wire.unpack(body)
    assert time.monotonic() - start < 1.0


SURROGATE = "def f(x):\n    raise ValueError('bad \\ud800 text')\n"


def test_a_lone_surrogate_from_the_sandbox_reaches_the_feedback_as_valid_text():
    # Before: the raw '\ud800' reached the feedback; the teacher's tokenizer raised TypeError.
    outcome, _ = judged(SURROGATE, "assert f(1) == 1")
    assert not outcome.passed
    outcome.feedback.encode("utf-8")  # no UnicodeEncodeError
    assert "bad \ufffd" in outcome.feedback
    for value in outcome.info.values():
        if isinstance(value, str):
            value.encode("utf-8")


def test_a_lone_surrogate_in_the_script_mode_report_is_made_valid_too():
    from vpd_lightning.tasks.sandbox.harness import run_tests

    outcome = run_tests([("<response>", SURROGATE)], [("<tests>", "assert f(1) == 1")])
    assert not outcome.passed
    outcome.feedback.encode("utf-8")


@pytest.mark.parametrize(
    "tests",
    [
        "assert all(map(f, [1, 2, 3]))",
        "assert list(map(f, [1, 2])) == []",
        "assert sum(map(f, [1, 2, 3])) == 0",
    ],
)
def test_stop_iteration_from_the_candidate_cannot_end_a_trusted_loop(tests):
    # Before: `all(map(f, ...))` saw the StopIteration as the end of the items: reward 1.
    outcome, _ = judged("def f(x):\n    raise StopIteration\n", tests)
    assert not outcome.passed, outcome.feedback
    assert "StopIteration" in outcome.feedback


@pytest.mark.parametrize("name", ["GeneratorExit", "KeyboardInterrupt", "SystemExit"])
def test_other_control_flow_exceptions_end_the_run_uncaught(name):
    # These held already: they end the tests (an `except Exception` in a test cannot catch them).
    code = f"def f(x):\n    raise {name}\n"
    outcome, _ = judged(code, "try:\n    assert all(map(f, [1]))\nexcept Exception:\n    pass\n")
    assert not outcome.passed, outcome.feedback


@pytest.mark.parametrize(
    "code",
    [
        "def f():\n    return object()\n",  # not plain data
        "def f():\n    import os\n    os._exit(0)\n",  # the sandbox dies
        "def f():\n    while True:\n        pass\n",  # the sandbox's deadline
    ],
    ids=["bad_return", "died", "timeout"],
)
def test_a_bare_except_in_the_tests_cannot_swallow_the_end_of_the_run(code):
    # Before: the tests caught the judge's stop and went on to pass (reward 1).
    tests = "try:\n    f()\nexcept BaseException:\n    pass\nassert True\n"
    outcome, _ = judged(code, tests, limits=SandboxLimits.for_tests(1.0, 1024, True))
    assert not outcome.passed, outcome.feedback


@pytest.mark.parametrize(
    ("code", "expected"),
    [("return 7 ** 20000", "7 ** 20000"), ("import math\n    return math.factorial(3000)", "")],
)
def test_correct_answers_too_long_for_str_still_pass(code, expected):
    # Before: reward 0 (the judge's repr of the value hit Python's 4300-digit int-to-str limit).
    tests = f"import math\nassert f() == {expected or 'math.factorial(3000)'}\n"
    outcome, _ = judged(f"def f():\n    {code}\n", tests)
    assert outcome.passed, outcome.feedback
    wrong, _ = judged("def f():\n    return 7 ** 20000 + 1\n", "assert f() == 7 ** 20000")
    assert not wrong.passed
    assert "f() returned <int of 16902 digits>" in wrong.feedback


def test_the_cache_of_exception_class_names_is_bounded():
    # Before: one class cached per name for ever (+73 MB for 50k names).
    judge._raised_class.cache_clear()
    for i in range(5000):
        exc = judge._raised(f"Error{i}", "m", None)
        assert exc.error_type == f"Error{i}" and isinstance(exc, judge.CandidateRaised)
    assert judge._raised_class.cache_info().currsize <= 256
    assert isinstance(judge._raised("ValueError", "m", None), ValueError)


def run_in_thread(function, wait_s: float):
    """``function()``'s value, or None if it is still running after ``wait_s`` (it is left running
    as a daemon thread: before the clock, trusted test code kept running for ever)."""
    box: list = []
    worker = threading.Thread(target=lambda: box.append(function()), daemon=True)
    worker.start()
    worker.join(wait_s)
    return box[0] if box else None


@pytest.mark.parametrize(
    "tests",
    [
        "for _ in range(f()):\n    pass\n",
        "try:\n    for _ in range(f()):\n        pass\nexcept BaseException:\n    pass\n",
        "def check(n):\n    return [i for i in range(n)]\nassert len(check(f())) > 0\n",
    ],
    ids=["loop", "bare_except", "helper"],
)
def test_the_trusted_tests_run_under_the_runs_wall_clock_budget(tests):
    limits = SandboxLimits.for_tests(1.0, 1024, True)
    code = "def f():\n    return 10 ** 10\n"
    result = run_in_thread(lambda: judged(code, tests, limits=limits), wait_s=8.0)
    assert result is not None, "the trusted tests were still running after 8 s"
    outcome, elapsed = result
    assert not outcome.passed and elapsed < 2.5
    assert outcome.feedback.startswith("Timed out after 1 s: the tests were still checking")
    assert outcome.info["status"] == "timeout"


def test_the_clock_leaves_the_threads_tracing_as_it_was():
    def tracer(frame, event, arg):
        return None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        outcome, _ = judged("def f():\n    return 1\n", "assert f() == 1")
        assert outcome.passed and sys.gettrace() is tracer
    finally:
        sys.settrace(previous)
