"""Every tool refuses numbers out of range and output paths it could not write at parse time: one usage line,
exit status 2, before any work (a sweep or a benchmark would otherwise run for minutes first)."""
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

MISSING = "/nonexistent-folder-for-this-test"
# (command, the refused option, what the one line says)
REFUSED = [
    (["-m", "kernels.bench", "--batch", "-1"], "--batch", "-1 is out of range: must be >= 1"),
    (["-m", "kernels.bench", "--reps", "0"], "--reps", "0 is out of range: must be >= 1"),
    (["-m", "kernels.bench", "--json", f"{MISSING}/bench.json"], "--json", f"folder {MISSING} does not exist"),
    (["-m", "train_student", "--workers", "100000"], "--workers", "CPU cores"),
    (["-m", "train_student", "bench", "--feed-workers", "100000"], "--feed-workers", "CPU cores"),
    (["-m", "kernels.sweep", "--quick", "--workers", "0"], "--workers", "0 is out of range: must be 1.."),
    (["-m", "kernels.sweep", "--quick", "--workers", "100000"], "--workers", "CPU cores"),
    (["-m", "kernels.sweep", "--quick", "--json", f"{MISSING}/x.json"], "--json", f"folder {MISSING} does not"),
    (["acceptance/gpu_check.py", "--budget-s", "-5"], "--budget-s", "-5 is out of range: must be > 0"),
    (["acceptance/gpu_check.py", "--budget-s", "nan"], "--budget-s", "nan is not a finite number"),
    (["acceptance/gpu_check.py", "--out", "README.md"], "--out", "README.md is a file, not a folder"),
    (["acceptance/wheelhouse.py", "--limit-mib", "0"], "--limit-mib", "0 is out of range: must be > 0"),
    (["acceptance/wheelhouse.py", "--out", "README.md"], "--out", "README.md is a file, not a folder"),
    (["-m", "cache_teacher", "views", "bench", "--batch", "0"], "--batch", "0 is out of range"),
    (["-m", "cache_teacher", "views", "bench", "--repeats", "0"], "--repeats", "0 is out of range"),
    (["-m", "cache_teacher", "views", "bench", "--seed", "-1"], "--seed", "-1 is out of range"),
    (["-m", "cache_teacher", "views", "bench", "--devices", "cpu,gpu"], "--devices", "'gpu' is not a device"),
    (["-m", "cache_teacher", "views", "bench", "--json", "tests"], "--json", "tests is a folder"),
    (["-m", "cache_teacher", "views", "grid", "--images", "a", "--backgrounds", "b", "--num", "0"], "--num",
     "0 is out of range"),
    (["-m", "cache_teacher", "views", "grid", "--images", "a", "--backgrounds", "b", "--out", f"{MISSING}/v.png"],
     "--out", f"folder {MISSING} does not exist"),
]


# Run in this process (their modules are imported by other tests anyway); the rest as the scripts they are.
IN_PROCESS = {"kernels.bench": "kernels.bench", "cache_teacher": "cache_teacher.__main__"}


def _refusal(command, monkeypatch, capsys) -> tuple[int, str]:
    if command[0] == "-m" and command[1] in IN_PROCESS:
        monkeypatch.chdir(REPO)
        with pytest.raises(SystemExit) as exited:
            importlib.import_module(IN_PROCESS[command[1]]).main(command[2:])
        return exited.value.code, capsys.readouterr().err
    done = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    return done.returncode, done.stderr


@pytest.mark.parametrize("command,option,reason", REFUSED, ids=[" ".join(c[0][-3:]) for c in REFUSED])
def test_out_of_range_values_and_unwritable_outputs_are_refused_at_parse_time(command, option, reason, monkeypatch,
                                                                             capsys):
    status, err = _refusal(command, monkeypatch, capsys)
    last = err.strip().splitlines()[-1]
    assert status == 2, err
    assert "Traceback" not in err and f"argument {option}: " in last and reason in last, err
