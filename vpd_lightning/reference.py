"""The README's configuration reference, generated from the options' own docstrings.

`python -m vpd_lightning.reference` prints the table; `--write-readme` puts it into README.md
between the `config-reference` markers. A test fails when the README's table differs, so an
option is described in exactly one place: its docstring (which `fit --help` shows too).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from pathlib import Path

import docstring_parser

from vpd_lightning.options import OPTION_GROUPS
from vpd_lightning.trainer.data import VPDDataModule
from vpd_lightning.trainer.module import VPDModule

BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"
README = Path(__file__).resolve().parents[1] / "README.md"
CLI_OPTIONS = [
    ("evaluate_before_after", True, "`fit`: validate before and after training, print both."),
]
SET_BY_CLI = {"model.task"}  # linked from data.task


def _docs(obj: object) -> dict[str, str]:
    parsed = docstring_parser.parse_from_object(obj)
    return {p.arg_name: " ".join((p.description or "").split()) for p in parsed.params}


def _default(value: object) -> str:
    if value is inspect.Parameter.empty:
        return "required"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def rows() -> list[tuple[str, str, str]]:
    """(key, default, description) of every option, in the order `fit --help` lists them."""
    out = []
    for prefix, cls in (("model", VPDModule), ("data", VPDDataModule)):
        docs = _docs(cls)
        for name, parameter in inspect.signature(cls.__init__).parameters.items():
            if name == "self" or f"{prefix}.{name}" in SET_BY_CLI:
                continue
            if prefix == "model" and name in OPTION_GROUPS:
                group = OPTION_GROUPS[name]
                field_docs = _docs(group)
                shown = "null" if name == "lora" else ""  # the other groups default to their fields
                out.append((f"{prefix}.{name}", shown, docs[name]))
                for field in dataclasses.fields(group):
                    default = (
                        field.default
                        if field.default is not dataclasses.MISSING
                        else field.default_factory()
                    )
                    out.append(
                        (f"{prefix}.{name}.{field.name}", _default(default), field_docs[field.name])
                    )
                continue
            default = parameter.default
            shown = "AdamW lr 1e-5" if name == "student_optimizer" else _default(default)
            out.append((f"{prefix}.{name}", shown, docs[name]))
    out += [(name, _default(default), text) for name, default, text in CLI_OPTIONS]
    return out


def render() -> str:
    lines = ["| option | default | meaning |", "| --- | --- | --- |"]
    for key, default, text in rows():
        lines.append(f"| `{key}` | {f'`{default}`' if default else ''} | {_cell(text)} |")
    return "\n".join(lines)


def readme_section(text: str) -> str:
    return text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip("\n")


def write_readme() -> None:
    text = README.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    README.write_text(text[:start] + "\n" + render() + "\n" + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-readme", action="store_true", help="update README.md in place")
    if parser.parse_args().write_readme:
        write_readme()
    else:
        print(render())


if __name__ == "__main__":
    main()
