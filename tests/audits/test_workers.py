"""``runtime.workers``: DataLoader processes read the cases; records do not depend on them."""

from __future__ import annotations

import torch

from medaudit.audits.execute import Session, execute
from medaudit.audits.plan import plan_jobs
from medaudit.core.spec import load_spec


def test_records_do_not_depend_on_the_reading_workers(write_spec, host):
    records = {}
    for workers in (0, 2):
        spec = load_spec(write_spec(
            data="data:\n  dataset: phantom\n  params: {n: 300, size: 32, seed: 0}",  # > 256 cases: read lazily
            attacks="attacks:\n  - name: fgsm", threat_model="threat_model:\n  norm: linf\n  epsilons: [2/255]",
            runtime=f"runtime:\n  device: cpu\n  batch_size: 128\n  workers: {workers}",
            name=f"w{workers}.yaml"), host)
        session = Session.load(spec, host, torch.device("cpu"))
        assert session.data.is_lazy
        clean_job, attack_job = [j for j in plan_jobs(spec, host) if j.defense == "none"]
        clean = execute(session, clean_job, 0, 300)
        records[workers] = (list(clean), list(execute(session, attack_job, 0, 300, clean)))
    assert records[0] == records[2]
