"""Faults in a run's lifecycle: SIGTERM, a read-only or full output folder, usage errors."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from medaudit.cli import cli
from medaudit.core.errors import ExitCode

FGSM = "attacks:\n  - name: fgsm"


def run_cli(*args: str):
    return CliRunner().invoke(cli, ["run", *args, "-q"])


def leftovers(folder: Path) -> list[str]:
    """Half-written files: temporary files and unfinished record files."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in {".tmp", ".partial"})


#: ``medaudit`` whose first record write (inside the first job, its .partial file open)
#: touches the marker file named by the first argument and waits there for the signal.
HELD_MEDAUDIT = """
import sys, time
from pathlib import Path
from medaudit.audits import records
from medaudit.cli import main

marker = Path(sys.argv.pop(1))
write = records.RecordWriter.write

def held_write(self, rows):
    if not marker.exists():
        marker.touch()
        time.sleep(120)
    write(self, rows)

records.RecordWriter.write = held_write
main()
"""


@pytest.mark.slow
def test_sigterm_stops_a_run_like_ctrl_c_and_the_run_resumes(write_spec, tmp_path, model_cache, demo_model):
    """A scheduler's SIGTERM in the middle of a job: its records are discarded, the interruption
    is logged with the signal's name, exit 2 with the resume command; --resume finishes the run."""
    run_dir, marker = tmp_path / "run", tmp_path / "in-a-job"
    spec = write_spec(attacks=FGSM, data="data:\n  dataset: phantom\n  params: {n: 16, size: 64, seed: 0}")
    env = {**os.environ, "MEDAUDIT_CACHE_DIR": str(model_cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", HELD_MEDAUDIT, str(marker), "run", str(spec), "--run-dir", str(run_dir), "-q"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    assert len(list((run_dir / "records").glob("*.partial"))) == 1
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.INTERRUPTED, (proc.returncode, out, err)
    assert "interrupted by SIGTERM: 0 of 4 jobs finished" in err and f"--resume {run_dir}" in err, err
    timeline = run_dir / "timeline.jsonl"
    events = [json.loads(line) for line in timeline.read_text().splitlines()]
    assert [(e["event"], e.get("signal")) for e in events] == [("start", None), ("interrupted", "SIGTERM")]
    assert leftovers(run_dir) == [] and not (run_dir / "results.json").exists()

    result = run_cli(str(spec), "--resume", str(run_dir))
    assert result.exit_code == ExitCode.PASS, result.output
    events = [json.loads(line)["event"] for line in timeline.read_text().splitlines()]
    assert [e for e in events if e != "job"] == ["start", "interrupted", "resume", "finished"]


def refuse_writes(monkeypatch, folder: Path, code: int) -> None:
    """Make creating files and folders at or under ``folder`` fail with ``code`` (EROFS: a
    read-only mount), as chmod cannot when the tests run as root."""
    def guarded(real):
        def call(path, *args, **kwargs):
            p = Path(os.fsdecode(path)).absolute()
            if p == folder or folder in p.parents:
                raise OSError(code, os.strerror(code), str(path))
            return real(path, *args, **kwargs)
        return call

    monkeypatch.setattr(os, "open", guarded(os.open))
    monkeypatch.setattr(os, "mkdir", guarded(os.mkdir))


def test_read_only_output_folder_is_refused_in_one_line_before_the_run(write_spec, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    refuse_writes(monkeypatch, out, errno.EROFS)
    result = run_cli(str(write_spec(attacks=FGSM)), "--output-dir", str(out))
    assert result.exit_code == ExitCode.USAGE_ERROR, result.output
    [line] = result.output.strip().splitlines()
    assert line.startswith(f"Error: {out}") and "Read-only file system" in line, line
    assert list(out.iterdir()) == []


def test_too_little_free_space_is_refused_before_the_run_dir_exists(write_spec, tmp_path, monkeypatch):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=100_000))
    out = tmp_path / "out"
    result = run_cli(str(write_spec(attacks=FGSM)), "--output-dir", str(out))
    assert result.exit_code == ExitCode.USAGE_ERROR, result.output
    [line] = result.output.strip().splitlines()
    assert "free" in line and "needs about" in line, line
    assert not out.exists()


def test_disk_full_while_writing_examples_leaves_no_half_file_and_resumes(write_spec, tmp_path, monkeypatch):
    """The disk fills while an examples file is being written: half of it reaches the disk,
    then ENOSPC. Exit 4 in one line, no half file, and --resume finishes once there is space."""
    real_save = torch.save
    full = {"on": True}

    def save_on_full_disk(obj, f, *args, **kwargs):
        name = os.fsdecode(f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", ""))
        if not (full["on"] and f"{os.sep}examples{os.sep}" in name):
            return real_save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real_save(obj, buf)
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as target:
                target.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        else:
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save_on_full_disk)
    before = signal.getsignal(signal.SIGTERM)
    run_dir = tmp_path / "run"
    spec = str(write_spec(attacks=FGSM))
    result = run_cli(spec, "--run-dir", str(run_dir))
    assert result.exit_code == ExitCode.USAGE_ERROR, result.output
    [line] = result.output.strip().splitlines()
    assert f"{run_dir / 'examples'}" in line and "No space left on device" in line, line
    assert f"--resume {run_dir}" in line, line
    assert leftovers(run_dir) == [] and list((run_dir / "examples").glob("*.pt")) == []
    assert signal.getsignal(signal.SIGTERM) is before  # the run's handler is gone again

    full["on"] = False  # space was freed
    result = run_cli(spec, "--resume", str(run_dir))
    assert result.exit_code == ExitCode.PASS, result.output
    for path in (run_dir / "examples").glob("*.pt"):
        torch.load(path, weights_only=True)
    assert leftovers(run_dir) == []


def test_usage_errors_exit_4_not_the_interrupted_code(write_spec, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    spec = str(write_spec(attacks=FGSM))
    for args in (["run", spec, "--run-dir", str(a_file)], ["run", spec, "--no-such-option"], ["run"], ["no-such-command"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == ExitCode.USAGE_ERROR, (args, result.output)
        assert "Error:" in result.output and "Traceback" not in result.output
    assert "notes.txt" in CliRunner().invoke(cli, ["run", spec, "--run-dir", str(a_file)]).output
    for args in (["--help"], ["--version"], ["run", "--help"]):
        assert CliRunner().invoke(cli, args).exit_code == 0, args


def test_resume_refuses_other_package_versions(write_spec, tmp_path):
    """Report guide fault 22: finished jobs of one version must not be mixed with jobs of another."""
    spec = str(write_spec(attacks=FGSM))
    run_dir = tmp_path / "run"
    assert run_cli(spec, "--run-dir", str(run_dir)).exit_code == ExitCode.PASS
    assert run_cli(spec, "--resume", str(run_dir)).exit_code == ExitCode.PASS  # same versions: resumable
    env = json.loads((run_dir / "environment.json").read_text(encoding="utf-8"))
    env["packages"]["torch"] = "0.0.1"
    (run_dir / "environment.json").write_text(json.dumps(env), encoding="utf-8")
    result = run_cli(spec, "--resume", str(run_dir))
    assert result.exit_code == ExitCode.USAGE_ERROR
    assert "software changed" in result.output and "torch 0.0.1 -> " in result.output


def test_init_into_a_missing_folder_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(cli, ["init", str(tmp_path / "no" / "such" / "audit.yaml")])
    assert result.exit_code == ExitCode.USAGE_ERROR
    assert "cannot write" in result.output and "Traceback" not in result.output
