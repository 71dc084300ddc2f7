"""Per-sample records: one JSON line per sample per job, written atomically per job.

A job's records are written to ``records/<id>.jsonl.partial`` and renamed to
``records/<id>.jsonl`` when the job is complete, so a file without the suffix always holds
a finished job and an interrupted run resumes from the first unfinished job.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

#: Fields of a record (classification). Minimum-norm attacks add ``min_norm``: the size of
#: the smallest fooling perturbation found for the sample (None when none was found).
FIELDS = ("case", "label", "clean_pred", "adv_pred", "attacked", "linf", "l2", "in_range")


def record_path(run_dir: Path, job_id: str) -> Path:
    return run_dir / "records" / f"{job_id}.jsonl"


def is_done(run_dir: Path, job_id: str) -> bool:
    return record_path(run_dir, job_id).is_file()


class RecordWriter:
    """Appends records of one job; :meth:`commit` makes the job count as done."""

    def __init__(self, run_dir: Path, job_id: str):
        self.final = record_path(run_dir, job_id)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.partial = self.final.with_name(self.final.name + ".partial")
        self._file = open(self.partial, "w", encoding="utf-8")

    def write(self, rows: Iterable[dict]) -> None:
        self._file.writelines(json.dumps(row, separators=(",", ":")) + "\n" for row in rows)

    def commit(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.partial, self.final)

    def discard(self) -> None:
        self._file.close()
        self.partial.unlink(missing_ok=True)


def read_records(run_dir: Path, job_id: str) -> list[dict]:
    """Records of a finished job, with the derived ``clean_correct``/``adv_correct`` flags."""
    rows = []
    with open(record_path(run_dir, job_id), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            row["clean_correct"] = row["clean_pred"] == row["label"]
            row["adv_correct"] = row["adv_pred"] == row["label"]
            rows.append(row)
    return rows
