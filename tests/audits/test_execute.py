"""A job's cases split across processes give the records of one process.

Each worker process builds its own :class:`Session` from what a run directory holds (the
resolved spec, its folder, the fitted defense state) and runs :func:`execute` on part of
the cases. Per-batch seeds make PGD's random start the same whichever process runs a
batch, and a fitted detector is restored from the run directory, never fitted again.
"""

from __future__ import annotations

import multiprocessing

import pytest

from medaudit.audits.execute import Session, execute, state_path
from medaudit.audits.plan import plan_jobs
from medaudit.core.spec import load_spec
from tests.conftest import spec_text

N, BATCH = 12, 4
#: The cases each worker runs: whole batches, the second half starting mid-data set.
SPLIT = ((0, 8), (8, N))
TRAIN = "{dataset: phantom, params: {n: 40, size: 64, seed: 5}}"
SPEC = spec_text(
    data=f"data:\n  dataset: phantom\n  params: {{n: {N}, size: 64, seed: 0}}",
    threat_model="threat_model:\n  norm: linf\n  epsilons: [8/255]",
    attacks="attacks:\n  - name: pgd\n    params: {steps: 3, random_start: true}",
    defenses=f"defenses:\n  - name: mahalanobis\n    id: maha\n    params: {{train_data: {TRAIN}}}",
    runtime=f"runtime:\n  device: cpu\n  batch_size: {BATCH}\n  seed: 0\n  num_threads: 1",
)


def _forbid_fitting(*args, **kwargs):
    raise AssertionError("the detector was fitted again instead of restored from the run directory")


def run_part(spec_dict: dict, base_dir: str, run_dir: str, start: int, stop: int, clean: dict[str, list]) -> dict:
    """In a fresh process: open a session from the run directory and run every job on cases
    ``[start, stop)`` (``clean``: the clean jobs' records of those cases, by defense)."""
    from medaudit.plugins.defenses import detectors

    detectors._DetectorDefense.apply = _forbid_fitting  # restore must not reach a fit
    session = Session.open(spec_dict, base_dir, run_dir)
    out = {}
    for job in plan_jobs(session.spec, session.host):
        if not job.is_clean:
            out[job.id] = list(execute(session, job, start, stop, clean[job.defense]))
    return out


@pytest.fixture(scope="module")
def split_run(tmp_path_factory):
    """Every job's records from one process, and from two worker processes that each ran half the cases."""
    base = tmp_path_factory.mktemp("execute")
    (base / "spec.yaml").write_text(SPEC, encoding="utf-8")
    run_dir = base / "run"
    run_dir.mkdir()
    from medaudit.core.host import get_host

    host = get_host(load_entry_points=False)
    spec_dict = load_spec(base / "spec.yaml", host).model_dump(mode="json")
    session = Session.open(spec_dict, base, run_dir, host)  # fits the detector: nothing to restore yet
    session.save_states(run_dir)
    jobs = plan_jobs(session.spec, host)
    clean = {job.defense: list(execute(session, job, 0, N)) for job in jobs if job.is_clean}
    whole = {job.id: list(execute(session, job, 0, N, clean[job.defense])) for job in jobs if not job.is_clean}
    parts = [(spec_dict, str(base), str(run_dir), start, stop,
              {label: rows[start:stop] for label, rows in clean.items()}) for start, stop in SPLIT]
    with multiprocessing.get_context("spawn").Pool(len(SPLIT)) as pool:
        results = pool.starmap(run_part, parts)
    split = {job_id: [row for part in results for row in part[job_id]] for job_id in whole}
    return {"whole": whole, "split": split, "jobs": jobs, "run_dir": run_dir}


@pytest.mark.slow
def test_a_job_split_across_processes_gives_the_records_of_one_process(split_run):
    whole, split = split_run["whole"], split_run["split"]
    [pgd] = [j for j in split_run["jobs"] if j.defense == "none" and j.attack == "pgd"]
    assert sum(r["attacked"] for r in whole[pgd.id]) > N // 2  # most cases are attacked: the random start matters
    assert [r["case"] for r in split[pgd.id]] == [r["case"] for r in whole[pgd.id]]
    assert split[pgd.id] == whole[pgd.id]


@pytest.mark.slow
def test_a_fitted_detector_is_restored_in_another_process_not_fitted_again(split_run):
    assert state_path(split_run["run_dir"], "defenses", "maha").is_file()
    defended = [j for j in split_run["jobs"] if j.defense == "maha" and not j.is_clean]
    assert {j.view for j in defended} == {"naive", "adaptive"}
    for job in defended:  # the workers refuse to fit, so their detector is the restored one
        assert all("clean_score" in r and "adv_rejected" in r for r in split_run["split"][job.id])
        assert split_run["split"][job.id] == split_run["whole"][job.id], job.title()
