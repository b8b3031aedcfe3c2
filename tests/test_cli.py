"""The ``lineside`` command line: every subcommand answers ``--help``, the shared flags have one name
(and their former spellings) everywhere, and no library module parses a command line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from lineside.cli import COMMANDS, EXPORT_FORMATS, main

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".venv", "tests", ".git", "build", "runs", "docs", "bench"}  # bench/ scripts keep their own parsers
ENTRY_POINTS = {"train.py", "score.py", "crossval.py"}

# commands that load a model / checkpoint, and those that write a result
LOADS_MODEL = ["score", "station", "bench", *(f"export {f}" for f in EXPORT_FORMATS)]
WRITES_OUT = ["score", "station", "crossval", *(f"export {f}" for f in EXPORT_FORMATS),
              "elpv manifest", "patch-memory fit", "patch-memory score", "patch-memory crossval"]


def _help(capsys, command: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*command.split(), "--help"])
    assert exc.value.code == 0, f"lineside {command} --help exited {exc.value.code}"
    return capsys.readouterr().out


@pytest.mark.parametrize("command", [*COMMANDS, *(f"export {f}" for f in EXPORT_FORMATS),
                                     "elpv manifest", "patch-memory fit", "patch-memory score", "patch-memory crossval"])
def test_every_command_answers_help(capsys, command):
    out = _help(capsys, command)
    assert out.startswith("usage: lineside ") and command in out.splitlines()[0]


def test_training_commands_answer_help(capsys):
    out = _help(capsys, "fit")
    assert "--config" in out and "--trainer" in out


def test_top_level_usage_lists_every_command(capsys):
    assert main(["--help"]) == 0 and main(["export", "--help"]) == 0
    assert main(["export"]) == 2  # a format is required
    out = capsys.readouterr().out
    assert all(name in out for name in [*COMMANDS, *EXPORT_FORMATS, "fit"])
    assert main(["no-such-command"]) == 2


@pytest.mark.parametrize("command", LOADS_MODEL)
def test_model_flag_has_one_name_and_the_ckpt_alias(capsys, command):
    assert "--model MODEL, --ckpt MODEL" in _help(capsys, command)


@pytest.mark.parametrize("command", WRITES_OUT)
def test_out_flag_has_one_name_and_the_output_alias(capsys, command):
    assert "--out OUT, --output OUT" in _help(capsys, command)


def test_former_spellings_parse_to_the_shared_names():
    from lineside.cli import bench, score, station

    a = score.build_parser().parse_args(["--ckpt", "m.ckpt", "--input", "cells/", "--output", "r.csv", "--batch-size", "8"])
    assert (a.model, a.out, a.batch_size, a.device) == ("m.ckpt", "r.csv", 8, "cpu")
    a = station.build_parser().parse_args(["--model", "m.onnx", "--source", "d/", "--out", "r.jsonl", "--batch-max", "4"])
    assert (a.model, a.out, a.batch_size) == ("m.onnx", "r.jsonl", 4)
    a = bench.build_parser().parse_args(["--ckpt", "m.ckpt", "--batch", "144", "--device", "cuda"])
    assert (a.model, a.batch_size, a.device) == ("m.ckpt", 144, "cuda")


def _parser_calls(path: Path) -> list[int]:
    """Lines of ``argparse.ArgumentParser(...)`` / ``ArgumentParser(...)`` calls in a file."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            if name == "ArgumentParser":
                lines.append(node.lineno)
    return lines


def test_no_library_module_parses_a_command_line():
    offenders = []
    for f in sorted(ROOT.rglob("*.py")):
        rel = f.relative_to(ROOT)
        if SKIP.intersection(rel.parts) or rel.parts[:2] == ("lineside", "cli") or str(rel) in ENTRY_POINTS:
            continue
        offenders += [f"{rel}:{n}" for n in _parser_calls(f)]
    assert not offenders, "argparse parsers outside lineside/cli/:\n" + "\n".join(offenders)


def test_the_checker_finds_a_parser(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import argparse\nfrom argparse import ArgumentParser\n\ndef main():\n    argparse.ArgumentParser()\n    ArgumentParser()\n")
    assert _parser_calls(f) == [5, 6]
