"""``run_cli``: one message on stderr and a meaningful exit status for every command-line tool."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from artifact.cli import EXIT_FAILED, EXIT_USAGE, RunFailed, UsageError, run_cli

ROOT = Path(__file__).resolve().parents[1]


def _raising(exc: BaseException):
    def main(argv):
        raise exc

    return main


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (UsageError("pass --data"), EXIT_USAGE),
        (ValueError("bad value"), EXIT_USAGE),
        (FileNotFoundError("no such file: x.pth"), EXIT_USAGE),
        (RunFailed("parity failed"), EXIT_FAILED),
        (RuntimeError("loss is nan"), EXIT_FAILED),
        (OSError(28, "No space left on device"), EXIT_FAILED),
    ],
)
def test_expected_errors_give_one_line_and_their_status(exc, status, capsys):
    assert run_cli(_raising(exc), [], prog="tool") == status
    err = capsys.readouterr().err
    assert err.startswith("tool: error: ") and str(exc) in err and err.count("\n") == 1


def test_results_usage_exits_and_bugs():
    assert run_cli(lambda argv: None, []) == 0
    assert run_cli(lambda argv: 3, []) == 3
    assert run_cli(lambda argv: {"top1": 1.0}, []) == 0
    assert run_cli(_raising(SystemExit(2)), []) == 2  # argparse, after printing the usage
    assert run_cli(_raising(SystemExit("stop: reason")), []) == EXIT_USAGE
    with pytest.raises(KeyError):  # a bug keeps its traceback
        run_cli(_raising(KeyError("x")), [])


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )


def test_training_run_bad_input_exits_2_without_a_traceback(tmp_path):
    out = ["--out", str(tmp_path / "run"), "--no-export"]
    cases = {
        "--epochs and --batch-size must be at least 1": ["--epochs", "0", *out],
        "--resume: no checkpoint.pth": ["--resume", *out],
        "invalid float value": ["--lr", "fast", *out],
    }
    for message, args in cases.items():
        proc = _cli("training.run", *args)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert message in proc.stderr and "Traceback" not in proc.stderr


def test_invert_missing_checkpoint_exits_2(tmp_path):
    proc = _cli("training.invert", "--checkpoint", str(tmp_path / "none.pth"), "--no-progress")
    assert proc.returncode == 2 and "none.pth" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_every_training_flag_says_its_default_and_when_to_change_it():
    from training.run import build_parser

    actions = [a for a in build_parser()._actions if a.option_strings and a.dest != "help"]
    assert len(actions) > 50
    for action in actions:
        text = action.help or ""
        assert len(text) > 30 and "default" in text.lower(), action.option_strings
    lr = next(a for a in actions if a.dest == "lr").help
    assert "quickstart 0.004" in lr and "vit_small 0.0005" in lr and "resnet50 0.03" in lr
