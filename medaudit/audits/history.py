"""The audit history: an index of finished audits, for comparing releases and for the
technical file.

Every finished audit adds a row to a SQLite index (``<output_dir>/history.sqlite`` unless
``runtime.history`` names another file). The index holds nothing a run directory does
not: :func:`rebuild` recreates it from the run directories' results.json, so deleting it
loses nothing. A run is found again by its directory or by its report id.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any, Iterator

from medaudit.core.errors import MedauditError

#: The index file's name in the output folder when the spec names none.
DEFAULT_INDEX = "history.sqlite"
#: ``runtime.history`` value that keeps a run out of the index.
OFF = "off"

_COLUMNS = (
    "report_id", "audit", "title", "task", "run_dir", "started", "finished", "verdict", "exit_code",
    "spec_sha256", "model_sha256", "data_sha256", "medaudit_version", "plugins", "headline",
)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS audits (
    report_id TEXT PRIMARY KEY, audit TEXT NOT NULL, title TEXT, task TEXT, run_dir TEXT NOT NULL,
    started TEXT, finished TEXT, verdict TEXT, exit_code INTEGER, spec_sha256 TEXT, model_sha256 TEXT,
    data_sha256 TEXT, medaudit_version TEXT, plugins TEXT, headline TEXT
);
CREATE INDEX IF NOT EXISTS audits_by_name ON audits (audit, finished);
"""
_JSON_COLUMNS = ("plugins", "headline")


def report_id(audit_name: str, started: str | None, fingerprints: dict[str, str], run_dir_name: str) -> str:
    """A short identifier of one run, stable across re-rendering: the same audit started at
    the same second on the same model, data and spec, in the same run directory."""
    key = json.dumps([audit_name, started, fingerprints, run_dir_name], sort_keys=True)
    return "MA-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def index_path(output_dir: Path, setting: str | None) -> Path | None:
    """The index a run in ``output_dir`` is recorded in (``runtime.history``): None when off;
    a relative path is taken from the output folder."""
    if setting == OFF:
        return None
    path = Path(setting or DEFAULT_INDEX)
    return path if path.is_absolute() else Path(output_dir) / path


def headline(results: dict[str, Any]) -> dict[str, float | None]:
    """The numbers a history line shows: each model's clean metrics and the worst case over
    the attacks at every budget, named ``metric[defense]`` and ``metric[defense@eps]``."""
    values: dict[str, float | None] = {}
    for defense, metrics in (results.get("clean") or {}).items():
        for name, value in metrics.items():
            values[f"{name}[{defense}]"] = value.get("value") if value else None
    for row in results.get("rows") or []:
        if row.get("attack") == "worst_case" and row.get("view") in (None, "naive"):
            for name, value in row.get("metrics", {}).items():
                if name.startswith("robust_"):
                    values[f"{name}[{row['defense']}@{row['epsilon_label']}]"] = value.get("value") if value else None
    return values


def entry(results: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The index row of a finished run."""
    audit, fingerprints = results["audit"], results.get("fingerprints", {})
    return {
        "report_id": audit.get("report_id") or report_id(audit["name"], audit.get("started"), fingerprints,
                                                          Path(run_dir).name),
        "audit": audit["name"], "title": audit.get("title"), "task": audit.get("task"),
        "run_dir": str(Path(run_dir).resolve()), "started": audit.get("started"), "finished": audit.get("finished"),
        "verdict": results.get("verdict"), "exit_code": results.get("exit_code"),
        "spec_sha256": fingerprints.get("spec_sha256"), "model_sha256": fingerprints.get("model_sha256"),
        "data_sha256": fingerprints.get("data_sha256"), "medaudit_version": results.get("medaudit_version"),
        "plugins": results.get("environment", {}).get("plugins", {}), "headline": headline(results),
    }


@contextlib.contextmanager
def connect(path: Path) -> Iterator[sqlite3.Connection]:
    """The index at ``path`` (created with its table if new), committed and closed after the block."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise MedauditError(f"{path}: the history index must be a file")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        db = sqlite3.connect(path, timeout=30)  # several audits may finish at once (CI matrix, Ray)
    except sqlite3.Error as exc:
        raise MedauditError(f"{path}: cannot open the history index ({exc})") from None
    try:
        db.executescript(_SCHEMA)
        with db:
            yield db
    except sqlite3.DatabaseError as exc:
        raise MedauditError(
            f"{path}: not a readable history index ({exc}); delete it and run: medaudit history --rebuild DIR"
        ) from None
    finally:
        db.close()


def _insert(db: sqlite3.Connection, row: dict[str, Any]) -> None:
    values = [json.dumps(row[c], sort_keys=True) if c in _JSON_COLUMNS else row[c] for c in _COLUMNS]
    db.execute(f"INSERT OR REPLACE INTO audits ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
               values)


def record(results: dict[str, Any], run_dir: Path, index: Path) -> dict[str, Any]:
    """Add (or update) a finished run in the index at ``index``; returns its row."""
    row = entry(results, run_dir)
    with connect(index) as db:
        _insert(db, row)
    return row


def run_dirs(folder: Path) -> list[Path]:
    """The finished run directories under ``folder`` (a results.json beside the run's fingerprints)."""
    return sorted(p.parent for p in Path(folder).rglob("results.json") if (p.parent / "fingerprints.json").is_file())


def rebuild(folder: Path, index: Path) -> tuple[int, list[str]]:
    """Index every finished run under ``folder`` again, and drop the rows of runs under it
    that no longer exist. Returns how many runs were indexed and the run directories whose
    results.json could not be read (left out, named)."""
    folder = Path(folder).resolve()
    skipped: list[str] = []
    rows = []
    for run_dir in run_dirs(folder):
        try:
            rows.append(entry(json.loads((run_dir / "results.json").read_text(encoding="utf-8")), run_dir))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            skipped.append(f"{run_dir}: {exc}")
    with connect(index) as db:
        for (report, where) in db.execute("SELECT report_id, run_dir FROM audits").fetchall():
            if Path(where).is_relative_to(folder) and not (Path(where) / "results.json").is_file():
                db.execute("DELETE FROM audits WHERE report_id = ?", (report,))
        for row in rows:
            _insert(db, row)
    return len(rows), skipped


def runs(index: Path, audit: str | None = None) -> list[dict[str, Any]]:
    """The indexed runs, oldest first (of one audit when ``audit`` names it)."""
    if not Path(index).is_file():
        return []
    with connect(index) as db:
        db.row_factory = sqlite3.Row
        query = "SELECT * FROM audits" + (" WHERE audit = ?" if audit else "") + " ORDER BY finished, report_id"
        rows = [dict(r) for r in db.execute(query, (audit,) if audit else ())]
    for row in rows:
        for column in _JSON_COLUMNS:
            row[column] = json.loads(row[column]) if row[column] else {}
    return rows


def resolve_run(ref: str | Path, index: Path | None = None) -> Path:
    """The run directory ``ref`` names: a run directory (holding results.json), a report id
    found in the index, or ``latest:<audit>`` for that audit's newest run in the index."""
    path = Path(ref)
    if (path / "results.json").is_file():
        return path
    index = Path(index) if index is not None else Path("runs") / DEFAULT_INDEX
    known = runs(index)
    text = str(ref)
    if text.startswith("latest:"):
        matches = [r for r in known if r["audit"] == text.removeprefix("latest:")]
        matches = matches[-1:]
    else:
        matches = [r for r in known if r["report_id"] == text]
    if not matches:
        where = f"in the history index {index}" if index.is_file() else f"(no history index at {index})"
        raise MedauditError(
            f"{ref}: neither a finished run directory (no results.json) nor a run {where}; "
            "name a run directory, a report id from `medaudit history`, or latest:<audit name>"
        )
    found = Path(matches[0]["run_dir"])
    if not (found / "results.json").is_file():
        raise MedauditError(f"{ref}: indexed at {found}, which no longer holds results.json; "
                            f"refresh the index with: medaudit history --rebuild <folder> --index {index}")
    return found
