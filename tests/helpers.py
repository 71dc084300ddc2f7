"""Small helpers shared by the tests: running an attack or an audit, interrupting one."""

from __future__ import annotations

import torch

import medaudit
from medaudit.core.components import Norm


def accuracy(model, x, y) -> float:
    with torch.inference_mode():
        return (model(x).argmax(1) == y).float().mean().item()


def run(attack, model, x, y, eps, norm=Norm.LINF, seed=0):
    """``attack.perturb`` with a fresh CPU generator seeded with ``seed``."""
    return attack.perturb(model, x, y, eps=eps, norm=norm, generator=torch.Generator().manual_seed(seed))


def run_audit(spec, host, resume_dir=None, *, runner=None, **run_options):
    """What ``medaudit run`` does: run the audit (``runner``, else a quiet :class:`Runner`),
    then write results.json and the reports. Returns the runner's ``Outcome``."""
    from medaudit.audits.runner import Runner
    from medaudit.reports.write import write_reports

    runner = runner or Runner(spec, host, show_progress=False)
    outcome = runner.run(resume_dir, **run_options)
    write_reports(outcome.run_dir, outcome.results, host, spec.report.formats, runner.data.sensitive_values,
                  runner.console)
    return outcome


class StopAfter:
    """A plugin that presses Ctrl-C after ``n`` jobs, through the job_finished hook."""

    def __init__(self, n: int):
        self.n, self.seen = n, []

    @medaudit.hookimpl
    def job_finished(self, job):
        self.seen.append(job.id)
        if len(self.seen) == self.n:
            raise KeyboardInterrupt
