"""The run directory: where an audit's inputs, records and outputs live.

    runs/<audit>/<UTC stamp>/
      spec.resolved.yaml  fingerprints.json  environment.json  timeline.jsonl
      records/<job-id>.jsonl  results.json  report.html
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

import yaml

from medaudit.core.errors import OutputError, ResumeError, RunDirError

FINGERPRINTS = "fingerprints.json"


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[IO]:
    """A temporary file in ``path``'s folder (``mode`` "w" or "wb"), fsynced and renamed to
    ``path`` when the block ends, removed if it fails (a full disk): never half a file. An
    ``OSError`` without a file name gets ``path``'s, so that the error message can name it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.NamedTemporaryFile(mode, dir=path.parent, suffix=".tmp", delete=False,
                                      encoding=None if "b" in mode else "utf-8")
    try:
        with tmp:
            yield tmp
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp.name, 0o644)  # NamedTemporaryFile creates 0600; outputs are meant to be shared
        os.replace(tmp.name, path)
    except BaseException as exc:
        Path(tmp.name).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(path)
        raise


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write text or bytes through :func:`atomic_file`."""
    with atomic_file(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def strict_json(data: Any) -> Any:
    """``data`` with every NaN or infinite float replaced by None: strict JSON parsers
    (browsers, jq, most languages) refuse the bare ``NaN`` that ``json.dumps`` writes."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {key: strict_json(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict_json(value) for value in data]
    return data


def json_text(data: Any) -> str:
    return json.dumps(strict_json(data), indent=2, sort_keys=False, default=str, allow_nan=False) + "\n"


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
    """The run's inputs; the fingerprints come last, as they make the folder resumable."""
    write_atomic(run_dir / "spec.resolved.yaml", yaml.safe_dump(spec_json, sort_keys=False))
    write_json(run_dir / "environment.json", environment)
    write_json(run_dir / FINGERPRINTS, fingerprints)


#: ``errno`` values of a write the user can fix: a full disk or quota, a read-only folder.
NOT_WRITABLE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def _existing_folder(path: Path) -> Path:
    """``path`` or, when it does not exist yet, its nearest existing parent folder."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    if not path.is_dir():
        raise OutputError(f"{path}: is a file, not a folder; choose another output folder")
    return path


def check_writable(path: Path) -> None:
    """Refuse an output folder (or the folder it would be created in) where no file can be
    created, before anything loads: a read-only mount fails in a second, not after the model."""
    folder = _existing_folder(path)
    try:
        fd, probe = tempfile.mkstemp(dir=folder, suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot write here ({os.strerror(exc.errno)}); choose another output folder") from None


def check_free_space(path: Path, needed: int) -> None:
    """Refuse to start when the disk holding ``path`` has less free space than ``needed`` bytes."""
    free = shutil.disk_usage(_existing_folder(path)).free
    if free < needed:
        raise OutputError(
            f"{path}: {free / 1e6:.1f} MB free but the run needs about {needed / 1e6:.1f} MB; free some space "
            "or choose another output folder"
        )


def output_error(exc: OSError, run_dir: Path | None) -> OutputError:
    """The one-line error for a write that failed on a full disk or a read-only folder during
    the run; the run directory, once it holds its fingerprints, is resumable."""
    where = exc.filename or run_dir or "the output folder"
    if run_dir is not None and (run_dir / FINGERPRINTS).is_file():
        then = f"resume the run, which keeps its finished jobs: medaudit run SPEC --resume {run_dir}"
    else:
        then = "run again"
    return OutputError(f"{where}: {os.strerror(exc.errno)}; free some space (or make the folder writable), then {then}")


#: Parts of environment.json that must not change across a resume: numbers computed with other
#: versions of the code would be mixed into one report.
PINNED_ENVIRONMENT = ("python", "packages", "plugins", "cuda")


def check_resumable(run_dir: Path, fingerprints: dict, environment: dict) -> None:
    """Refuse to resume when the spec, model or data differ from the run's, or the Python,
    package, plugin or CUDA versions do (:data:`PINNED_ENVIRONMENT`)."""
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
    env_path = run_dir / "environment.json"
    before = json.loads(env_path.read_text(encoding="utf-8")) if env_path.is_file() else {}
    drift = []
    for key in PINNED_ENVIRONMENT:
        old, new = before.get(key), environment.get(key)
        if isinstance(old, dict) or isinstance(new, dict):
            old, new = old or {}, new or {}
            drift += [f"{name} {old.get(name)} -> {new.get(name)}" for name in sorted(set(old) | set(new))
                      if old.get(name) != new.get(name)]
        elif old != new:
            drift.append(f"{key} {old} -> {new}")
    if drift:
        raise ResumeError(
            f"{run_dir}: cannot resume: the software changed since the run started ({'; '.join(drift)}), and its "
            "finished jobs would be mixed with jobs run by other versions; start a new run, or resume with the "
            "versions of environment.json"
        )


def log_event(run_dir: Path, **event: Any) -> None:
    """Append an event; the file is rewritten atomically, so a full disk never cuts a line."""
    path = run_dir / "timeline.jsonl"
    before = path.read_text(encoding="utf-8") if path.is_file() else ""
    write_atomic(path, before + json.dumps({"at": utc_now(), **event}) + "\n")


def read_timeline(run_dir: Path) -> list[dict]:
    path = run_dir / "timeline.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
