"""The `sparse-dit` command line: --version, help that states defaults and shows an example, one-line errors."""

import argparse
import subprocess
import sys

import pytest

import sparse_dit
from sparse_dit.cli import build_parser, main


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """main(argv) in-process: (exit code, stdout, stderr), whether it returned or argparse exited."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command words, parser) for the root and every subcommand, nested ones (`bench kernels`) included."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*path, name))


def test_version(capsys):
    code, out, err = run(["--version"], capsys)
    assert code == 0 and out == f"sparse-dit {sparse_dit.__version__}\n" and not err


def test_every_command_shows_an_example_and_every_option_its_default():
    seen = []
    for path, parser in commands(build_parser()):
        seen.append(" ".join(path))
        text = parser.format_help()
        assert "example:\n  sparse-dit " in text, f"`sparse-dit {' '.join(path)} --help` shows no example"
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            line = formatter._expand_help(action)  # the help text as printed, defaults appended
            assert "default" in line.lower() or "(required)" in line, f"{path} {action.option_strings}: {line!r}"
            assert "default: None" not in line and "default: []" not in line, f"{path} {action.option_strings}: {line!r}"
    assert {"", "demo", "eval", "bench", "bench kernels", "methods", "train-demo", "score-demo"} <= set(seen)


def test_help_shows_the_default(capsys):
    code, out, _ = run(["bench", "kernels", "--help"], capsys)
    out = " ".join(out.split())  # help text is wrapped to the terminal
    assert code == 0 and "(default: 8192,16384,32768)" in out and "(default: float32)" in out


@pytest.fixture(scope="module")
def demo_pipe():
    """The shipped demo pipeline, loaded once, for the errors that only an evaluation with a pipeline can find."""
    from sparse_dit.demo import load_demo_pipeline

    return load_demo_pipeline()


ERRORS = {  # id: (argv, words of the message, whether the pipeline may load first); "{tmp}" is a fresh folder
    "unknown method": (["demo", "--method", "nope"], "unknown sparse attention method 'nope'", False),
    "bad options json": (["demo", "--options", "{window: 3}"], "--options is not valid JSON", False),
    "options not an object": (["demo", "--options", "[3, 7, 7]"], "must be a JSON object", False),
    "unknown option": (["demo", "--options", '{"nope": 1}'], "unknown option", False),
    "unknown caption word": (["demo", "--prompt", "a purple circle moving left"], "unknown caption word(s) ['purple']",
                             False),
    "pattern file as method": (["demo", "--method", "out/window.safetensors"], "is a pattern file", False),
    "missing prompts file": (["eval", "--out", "{tmp}/eval", "--prompts", "{tmp}/none.txt"], "no such file", False),
    "bad --config": (["eval", "--out", "{tmp}/eval", "--config", "window=3"], "--config expects METHOD.KEY=VALUE", False),
    "eval unknown method": (["eval", "--out", "{tmp}/eval", "--methods", "dense,nope"], "unknown sparse attention method",
                            True),
    "eval config error": (["eval", "--out", "{tmp}/eval", "--config", "window.nope=1"], "unknown option", True),
    "attention window": (["attention", "--window", "3,5"], "--window takes three", False),
    "missing --import file": (["--import", "{tmp}/none.py", "methods"], "no such file", False),
    "missing --import module": (["--import", "no_such_module_xyz", "methods"], "no module named 'no_such_module_xyz'",
                                False),
    "bad list value": (["bench", "kernels", "--seq", "8192,x"], "expected comma-separated int values", False),
    "bad int value": (["demo", "--steps", "many"], "invalid int value", False),
    "unknown command": (["frobnicate"], "invalid choice", False),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_expected_errors_are_one_line_and_exit_2(case, capsys, tmp_path, monkeypatch, request):
    argv, words, loads = ERRORS[case]

    def no_loading(*args, **kwargs):
        raise AssertionError("loaded the pipeline before the error")

    def no_generation(*args, **kwargs):
        raise AssertionError("generated before the error")

    # Errors come before any generation, and those the flags alone show before the pipeline loads.
    pipe = request.getfixturevalue("demo_pipe") if loads else None
    capsys.readouterr()  # the loading progress bars, not the command's output
    monkeypatch.setattr("sparse_dit.demo.load_demo_pipeline", (lambda *args, **kwargs: pipe) if loads else no_loading)
    monkeypatch.setattr("sparse_dit.demo.pipeline.ShapesVideoPipeline.__call__", no_generation)
    code, _, err = run([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("sparse-dit") and ": error: " in err, err
    assert words in err and "Traceback" not in err


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr("sparse_dit.cli.methods.cmd_methods", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["methods"])


def test_the_installed_command_exits_2_with_one_line():
    result = subprocess.run([sys.executable, "-m", "sparse_dit.cli", "demo", "--prompt", "a purple circle"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("sparse-dit: error: unknown caption word") and result.stderr.count("\n") == 1
