"""--log: everything to the log file, only progress lines and errors on the terminal."""

import subprocess
import sys

from rapm.progress import Progress

SCRIPT = """
import logging, sys, warnings
from rapm.progress import Progress, redirect_output
redirect_output(sys.argv[1])
logging.basicConfig(level=logging.INFO)
print("library noise on stdout")
print("library noise on stderr", file=sys.stderr)
warnings.warn("a library warning")
bar = Progress(4, "train rapm", every_s=0.0)
for _ in range(4):
    bar.update(1)
"""


def test_log_file_gets_everything_and_the_terminal_only_progress(tmp_path):
    log = tmp_path / "job.log"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], capture_output=True, text=True, check=True)
    terminal = proc.stderr.splitlines()
    assert proc.stdout == ""
    assert len(terminal) == 4 and all(line.startswith("train rapm: ") for line in terminal)
    assert terminal[0].startswith("train rapm: 1/4 (25%)") and "ETA" in terminal[0]
    assert terminal[-1].startswith("train rapm: 4/4 (100%)") and "done in" in terminal[-1]
    text = log.read_text()
    for expected in ("library noise on stdout", "library noise on stderr", "a library warning", "train rapm: 4/4"):
        assert expected in text


def test_progress_reports_at_most_every_interval_and_at_the_end(monkeypatch):
    lines = []
    monkeypatch.setattr(Progress, "report", lambda self: lines.append(self.line()))
    bar = Progress(1000, "sample teacher", unit="img", every_s=3600.0)
    for _ in range(10):
        bar.update(100)
    assert len(lines) == 1 and lines[0].startswith("sample teacher: 1000/1000 (100%)")
    bar = Progress(10, "x", initial=4, every_s=3600.0)
    bar.note = "loss 0.5"
    assert bar.line().startswith("x: 4/10 (40%), 0 it/s") and bar.line().endswith("[loss 0.5]")


def test_cli_errors_reach_the_terminal_and_the_log(tmp_path):
    log = tmp_path / "train.log"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rapm",
            "--log",
            str(log),
            "train",
            "--config",
            str(tmp_path / "missing.yaml"),
            "--trajectories",
            str(tmp_path),
            "--out-dir",
            str(tmp_path / "o"),
            "--state-dir",
            str(tmp_path / "s"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "rapm train:" in proc.stderr and "missing.yaml" in proc.stderr and str(log) in proc.stderr
    assert "missing.yaml" in log.read_text()
