"""The CLI: one clear line and a non-zero exit for bad options and missing data, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from erde.cli import main


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "erde.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("args", "message"), [
    (["train-teacher", "--out", "{tmp}/r", "--data-dir", "{tmp}/nowhere"], "not found in"),
    (["train-teacher", "--out", "{tmp}/r", "--epochs", "0"], "--epochs"),
    (["distill", "--out", "{tmp}/r", "--loss", "erde"], "needs --teacher"),
    (["distill", "--out", "{tmp}/r", "--teacher", "{tmp}/nothing", "--dataset", "synthetic"], "no manifest.json"),
    (["info", "{tmp}/nothing"], "no manifest.json"),
    (["calibrate", "{tmp}/nothing"], "not a finished run"),
    (["train-teacher", "--out", "{tmp}/r", "--resume", "--dataset", "synthetic"], "nothing to resume"),
])
def test_errors_are_one_line(tmp_path, capsys, args: list[str], message: str) -> None:
    code = main([a.replace("{tmp}", str(tmp_path)) for a in args])
    err = capsys.readouterr().err
    assert code == 1 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_help_and_argument_errors(capsys) -> None:
    assert "train-teacher" in run("--help").stdout  # the module runs as a program; the rest in this process
    for command in ("train-teacher", "distill", "calibrate", "export", "evaluate", "info", "serve"):
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0 and f"usage: erde {command}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as bad:
        main(["distill", "--out", "x", "--loss", "mse"])
    err = capsys.readouterr().err
    assert bad.value.code == 2 and "invalid choice" in err and "Traceback" not in err


def test_info_and_evaluate_on_an_artifact(tiny_pipeline, tmp_path, capsys) -> None:
    assert main(["info", str(tiny_pipeline.student_artifact)]) == 0
    assert '"macs_per_exit"' in capsys.readouterr().out
    assert main(["evaluate", str(tiny_pipeline.teacher_artifact), str(tiny_pipeline.student_artifact),
                 "--out", str(tmp_path), "--title", "tiny"]) == 0
    table = (tmp_path / "tiny.md").read_text()
    assert "| student/1 | 0.25" in table and (tmp_path / "tiny.png").stat().st_size > 1000
    assert (tmp_path / "tiny-exits.png").is_file()
