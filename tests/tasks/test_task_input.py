"""Bad task arguments and data files (issue 21): exit 2 before the model loads, one line naming the
key or the file and line, and what is accepted. Run through the real CLI as a subprocess."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vpd_lightning.errors import UserInputError
from vpd_lightning.tasks import ArithmeticTask, HumanEvalTask, JsonlTask, SciKnowEvalTask

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs/tiny.yaml")
KEY = "data.task.init_args"

# One interpreter runs every case (an interpreter start with torch and Lightning costs seconds):
# the model and tokenizer loaders are replaced by ones that fail loudly, then the CLI's `main` is
# called once per argument list, and its exit status and stderr are reported as JSON.
RUNNER = """
import contextlib, io, json, sys
import vpd_lightning.trainer.module as module

def refuse(*args, **kwargs):
    raise RuntimeError("MODEL LOADED")

module.load_causal_lm = module.load_tokenizer = refuse
from vpd_lightning.cli import main

results = []
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            main(args)
        code = 0
    except SystemExit as exit:
        code = exit.code
    except BaseException as error:
        code, err = repr(error), io.StringIO(repr(error))
    results.append({"code": code, "err": err.getvalue()})
print(json.dumps(results))
"""


def jsonl(path: Path, lines: list[bytes]) -> list[str]:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return ["--data.task", "vpd_lightning.tasks.JsonlTask", f"--{KEY}.path", str(path)]


GOOD = [json.dumps({"prompt": f"q{i}", "answer": str(i)}).encode() for i in range(4)]


def cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments after `fit --config tiny.yaml`, what the one error line must hold).
    Each costs about 2 s (LightningCLI builds its parser); the other arguments are checked by
    the same constructors, tested directly below."""
    humaneval = ["--data.task", "vpd_lightning.tasks.HumanEvalTask"]
    not_utf8 = tmp / "latin1.jsonl"
    surrogate = tmp / "surrogate.jsonl"
    return {
        "max_operand": (
            [f"--{KEY}.max_operand", "1"],
            f"{KEY}.max_operand = 1: must be an integer >= 2",
        ),
        "timeout_s": (
            [*humaneval, f"--{KEY}.timeout_s", "0"],
            f"{KEY}.timeout_s = 0.0: must be a number of seconds >= 0.1",
        ),
        "match": (
            [*jsonl(tmp / "ok.jsonl", GOOD), f"--{KEY}.match", "fuzzy"],
            f"{KEY}.match = 'fuzzy': must be one of auto, exact, numeric",
        ),
        "not_utf8": (
            jsonl(not_utf8, [*GOOD[:2], '{"prompt": "café", "answer": "1"}'.encode("latin-1")]),
            f"{not_utf8}:3: not UTF-8 text (byte 0xe9 at column 16); save the file as UTF-8",
        ),
        "surrogate": (
            jsonl(surrogate, [GOOD[0], b'{"prompt": "q \\ud800", "answer": "1"}']),
            f"{surrogate}:2: `prompt` holds a lone surrogate ('\\ud800' at character 3)",
        ),
    }


def test_bad_task_input_exits_2_in_one_line_before_the_model_loads(tmp_path):
    expected = cases(tmp_path)
    argument_lists = [["fit", "--config", TINY, *args] for args, _ in expected.values()]
    start = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(argument_lists)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    elapsed = time.monotonic() - start
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for (name, (_, line)), result in zip(expected.items(), results, strict=True):
        assert result["code"] == 2, (name, result)
        errors = [e for e in result["err"].splitlines() if e.startswith("vpd_lightning: error:")]
        assert len(errors) == 1 and "Traceback" not in result["err"], (name, result["err"])
        assert line in errors[0], (name, errors[0])
    assert elapsed < 60, f"{elapsed:.0f} s for {len(expected)} refusals"


def test_python_m_vpd_lightning_refuses_num_ops_0(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "vpd_lightning", "fit", "--config", TINY, f"--{KEY}.num_ops", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("vpd_lightning:")]
    assert errors == [f"vpd_lightning: error: {KEY}.num_ops = 0: must be an integer >= 1"]
    assert not (tmp_path / "runs").exists()  # nothing was started


@pytest.mark.parametrize(
    ("build", "key"),
    [
        (lambda: ArithmeticTask(operations="+/"), "operations = '+/'"),
        (lambda: ArithmeticTask(answer_format="first"), "answer_format = 'first'"),
        (lambda: ArithmeticTask(num_ops=True), "num_ops = True"),
        (lambda: ArithmeticTask(num_test=0), "num_test = 0"),
        (lambda: HumanEvalTask(memory_mb=0), "memory_mb = 0"),
        (lambda: HumanEvalTask(feedback_chars=5), "feedback_chars = 5"),
        (lambda: HumanEvalTask(test_fraction=1.5), "test_fraction = 1.5"),
        (lambda: HumanEvalTask(timeout_s=float("inf")), "timeout_s = inf"),
        (lambda: HumanEvalTask(timeout_s=float("nan")), "timeout_s = nan"),
        (lambda: SciKnowEvalTask(path=".", domains=[]), "domains = []"),
    ],
)
def test_other_bad_task_arguments_name_their_key(build, key):
    with pytest.raises(UserInputError, match=f"^{re.escape(f'{KEY}.{key}')}: must"):
        build()


def test_a_sciknoweval_file_is_read_when_the_task_is_built(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"prompt": "Q?\\nA: x\\nB: y", "answer": "A"}\n')
    (tmp_path / "test.jsonl").write_bytes(b'{"prompt": "Q\\ud800", "answer": "B"}\n')
    with pytest.raises(UserInputError, match=r"test\.jsonl:1: `prompt` holds a lone surrogate"):
        SciKnowEvalTask(path=str(tmp_path))


def test_a_surrogate_anywhere_in_a_record_is_refused_and_valid_text_is_kept(tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [
        {"prompt": [{"role": "user", "content": "é 漢字 🙂"}], "answer": "1"},
        {"prompt": [{"role": "user", "content": "ok"}], "answer": "2"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert len(JsonlTask(path=str(path)).records("train")) == 1
    with path.open("a") as handle:
        handle.write('{"prompt": [{"role": "user", "content": "\\udfff"}], "answer": "3"}\n')
    with pytest.raises(UserInputError, match=r"chat\.jsonl:3: `prompt` holds a lone surrogate"):
        JsonlTask(path=str(path))


def test_too_few_distinct_problems_are_announced():
    with pytest.warns(UserWarning, match=r"give only 18 distinct problems"):
        task = ArithmeticTask(num_ops=1, max_operand=3, operations="+-", num_train=50, num_test=5)
    assert len(task.records("train")) + len(task.records("test")) == 18
