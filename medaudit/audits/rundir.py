"""The run directory: where an audit's inputs, records and outputs live.

    runs/<audit>/<UTC stamp>/
      spec.resolved.yaml  fingerprints.json  environment.json  timeline.jsonl
      records/<job-id>.jsonl  results.json  report.html
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from medaudit.core.errors import ResumeError, RunDirError

FINGERPRINTS = "fingerprints.json"


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and ``os.replace``: never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False, encoding="utf-8") as tmp:
        tmp.write(text)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.chmod(tmp.name, 0o644)  # NamedTemporaryFile creates 0600; outputs are meant to be shared
    os.replace(tmp.name, path)


def json_text(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=False, default=str) + "\n"


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json_text(data))


def new_run_dir(output_dir: Path, audit_name: str) -> Path:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = output_dir / audit_name / stamp
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{stamp}-{i}")
    path.mkdir(parents=True)
    return path


#: Files that mark a folder as a medaudit run directory: ``--force`` replaces only such a folder.
RUN_DIR_MARKERS = (FINGERPRINTS, "spec.resolved.yaml", "timeline.jsonl")


def check_run_dir(path: Path, force: bool) -> None:
    """Refuse a run directory named by the user that holds files, unless ``force``; even
    with ``force``, refuse a folder that is not a medaudit run directory. Deletes nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{path}: exists and is not a directory; name a run directory")
    if not path.is_dir() or not any(path.iterdir()):
        return
    if not force:
        raise RunDirError(
            f"{path}: the run directory exists and is not empty; use --force to replace its contents "
            "(removed only once the model and data have loaded), or name another directory"
        )
    if not any((path / marker).exists() for marker in RUN_DIR_MARKERS):
        raise RunDirError(
            f"{path}: not empty and not a medaudit run directory (no {FINGERPRINTS}); --force replaces only an "
            "earlier run: name another directory"
        )


def claim_run_dir(path: Path, force: bool) -> Path:
    """The run directory named by the user, created, or emptied when ``force`` allows
    (see :func:`check_run_dir`)."""
    path = Path(path)
    check_run_dir(path, force)
    path.mkdir(parents=True, exist_ok=True)
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    return path


def init_run_dir(run_dir: Path, spec_json: dict, fingerprints: dict, environment: dict) -> None:
    write_atomic(run_dir / "spec.resolved.yaml", yaml.safe_dump(spec_json, sort_keys=False))
    write_json(run_dir / FINGERPRINTS, fingerprints)
    write_json(run_dir / "environment.json", environment)


def check_resumable(run_dir: Path, fingerprints: dict) -> None:
    """Refuse to resume when the spec, model or data differ from the run's."""
    path = run_dir / FINGERPRINTS
    if not path.is_file():
        raise ResumeError(f"{run_dir}: not a medaudit run directory (no {FINGERPRINTS})")
    stored = json.loads(path.read_text(encoding="utf-8"))
    changed = [key for key in sorted(set(stored) | set(fingerprints)) if stored.get(key) != fingerprints.get(key)]
    if changed:
        raise ResumeError(
            f"{run_dir}: cannot resume: {', '.join(changed)} changed since the run started; "
            "start a new run instead"
        )


def log_event(run_dir: Path, **event: Any) -> None:
    with open(run_dir / "timeline.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"at": utc_now(), **event}) + "\n")


def read_timeline(run_dir: Path) -> list[dict]:
    path = run_dir / "timeline.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
