"""The ``medaudit`` command line.

Exit codes (``ExitCode``) follow pytest's: 2 is an interrupted run (Ctrl-C, SIGTERM, SIGHUP),
resumable; 4 a usage error, click's own included (an unknown option, a missing argument, a
``--run-dir`` that names a file), which click would otherwise give 2.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
import signal
import sys
import traceback
from functools import wraps
from pathlib import Path

import click

from medaudit import __version__
from medaudit.core.errors import ExitCode, MedauditError, Terminated
from medaudit.core.text import printable

STARTER_SPEC = Path(__file__).parent / "audits" / "starter.yaml"


def _host():
    from medaudit.core.host import get_host

    host = get_host()
    for failed in host.failed:
        click.secho(printable(f"warning: plugin {failed.name!r} ({failed.distribution}) failed to load and was skipped: {failed.error}"),
                    fg="yellow", err=True)
    return host


def handle_errors(func):
    """One line for user errors (exit code per error), a traceback only for bugs (exit 3)."""

    @wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except MedauditError as exc:
            click.secho(f"Error: {printable(str(exc))}", fg="red", err=True)
            sys.exit(int(exc.exit_code))
        except KeyboardInterrupt as exc:
            click.secho(f"Interrupted ({exc.signal_name})." if isinstance(exc, Terminated) else "Interrupted.", fg="red", err=True)
            sys.exit(int(ExitCode.INTERRUPTED))
        except click.exceptions.Exit:
            raise
        except Exception:
            traceback.print_exc()
            click.secho("Internal error: this is a bug in medaudit or a plugin (traceback above).", fg="red", err=True)
            sys.exit(int(ExitCode.INTERNAL_ERROR))

    return wrapper


@contextlib.contextmanager
def signals_interrupt():
    """SIGTERM (what CI systems and schedulers send) and SIGHUP stop the block the way Ctrl-C
    does, as a :class:`Terminated` ``KeyboardInterrupt``; the previous handlers come back after."""
    def stop(signum, frame):
        raise Terminated(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if sig}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Group(click.Group):
    """Click's usage errors exit 4 (``ExitCode.USAGE_ERROR``): click's own 2 means "interrupted" here."""

    def make_context(self, *args, **kwargs):
        with _usage_error_code():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _usage_error_code():
            return super().invoke(ctx)


@contextlib.contextmanager
def _usage_error_code():
    try:
        yield
    except click.UsageError as exc:
        exc.exit_code = int(ExitCode.USAGE_ERROR)
        raise


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="medaudit")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """Audit the adversarial robustness of medical image models.

    Exit codes of `run`: 0 PASS, 1 FAIL, 2 interrupted (Ctrl-C, SIGTERM; resumable), 3 internal
    error, 4 bad command line, spec or input, or an output folder that is read-only or full,
    5 nothing to evaluate (no criteria or no cases), 6 INCONCLUSIVE,
    7 INVALID (a gating validity check failed).
    """
    from rich.logging import RichHandler

    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    handler = RichHandler(show_path=False, show_time=False)
    handler.addFilter(printable_log_record)
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler])


def printable_log_record(record: logging.LogRecord) -> bool:
    """Log lines carry paths and plugin text: escape control characters before the terminal sees them."""
    record.msg, record.args = printable(record.getMessage()), None
    return True


@cli.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False, exists=True, path_type=Path), help="Finish an interrupted run in this run directory.")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path), help="Override runtime.output_dir.")
@click.option("--run-dir", "run_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write the run to exactly this directory instead of <output_dir>/<audit>/<stamp>; refused if it holds files, unless --force.")
@click.option("--force", is_flag=True, help="With --run-dir: replace an earlier run there (its files are removed once the model and data have loaded).")
@click.option("--device", help="Override runtime.device (auto, cpu, cuda, cuda:N).")
@click.option("--executor", type=click.Choice(["local", "ray"]), help="Override runtime.executor: ray shards the jobs over worker processes (GPUs, a cluster).")
@click.option("--ray-address", help="Override runtime.ray.address (auto: the cluster started here with `ray start`; ray://host:port).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.option("--dry-run", is_flag=True,
              help="Load the model and data, plan the jobs and print each one's cases and estimated passes and time "
                   "(from a short probe of every attack); runs no audit and writes nothing.")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: print the plan as JSON.")
@handle_errors
def run(
    spec_path: Path, resume_dir: Path | None, output_dir: Path | None, run_dir: Path | None, force: bool,
    device: str | None, executor: str | None, ray_address: str | None, quiet: bool, dry_run: bool, as_json: bool,
) -> None:
    """Run the audit described by SPEC and write its report."""
    from medaudit.audits import history
    from medaudit.audits.plan import check_model_access
    from medaudit.audits.runner import Runner
    from medaudit.core.spec import load_spec
    from medaudit.reports.write import check_reports_possible, write_reports

    if resume_dir is not None and run_dir is not None:
        raise MedauditError("--resume and --run-dir exclude each other: --resume already names the run directory")
    if force and run_dir is None:
        raise MedauditError("--force only applies with --run-dir (a new stamped run directory never overwrites anything)")
    if as_json and not dry_run:
        raise MedauditError("--json only applies with --dry-run")
    if dry_run and resume_dir is not None:
        raise MedauditError("--dry-run plans a new run; it does not apply with --resume")
    if run_dir is not None:
        from medaudit.audits.rundir import check_run_dir

        check_run_dir(run_dir, force)  # before anything loads
    host = _host()
    spec = load_spec(spec_path, host)
    check_model_access(spec, host)  # what the loader declares; refused before anything loads
    overrides = {k: v for k, v in {"output_dir": output_dir, "device": device, "executor": executor}.items() if v is not None}
    if ray_address is not None:
        overrides["ray"] = spec.runtime.ray.model_copy(update={"address": ray_address})
    if overrides.get("executor") == "ray":
        from medaudit.core.errors import SpecError
        from medaudit.core.spec import RAY_INSTALL, ray_installed

        if not ray_installed():
            raise SpecError([f"--executor ray needs Ray, which is not installed: {RAY_INSTALL}"], source="command line")
    if overrides:
        spec = spec.model_copy(update={"runtime": spec.runtime.model_copy(update=overrides)})
    check_reports_possible(spec.report.formats)  # a missing browser stops the run now, not after the audit
    if dry_run:
        from medaudit.audits.dryrun import dry_run as plan_run, format_plan

        plan = plan_run(spec, host)
        click.echo(json.dumps(plan, indent=2) if as_json else printable(format_plan(plan)))
        return
    command = shlex.join(["medaudit", *sys.argv[1:]])
    runner = Runner(spec, host, show_progress=not quiet, command=command)
    with signals_interrupt():
        outcome = runner.run(resume_dir, run_dir=run_dir, force=force)
        write_reports(outcome.run_dir, outcome.results, host, spec.report.formats, runner.data.sensitive_values,
                      runner.console, history_index=history.index_path(spec.runtime.output_dir, spec.runtime.history))
    results = outcome.results
    for c in results["acceptance"]["criteria"]:
        advisory = " (advisory: does not change the verdict)" if c["severity"] == "advisory" else ""
        click.echo(printable(
            f"  {c['id']}: {c['verdict']}{advisory}  ({c['metric']} {c['statistic'].replace('_', ' ')} {c['op']} {c['threshold']})",
            one_line=True,
        ))
    colour = {"PASS": "green", "FAIL": "red"}.get(results["verdict"], "yellow")
    click.secho(f"verdict: {results['verdict']} (exit code {outcome.exit_code})", fg=colour, bold=True)
    report = outcome.run_dir / "report.html"
    click.echo(printable(f"report: {report if report.exists() else outcome.run_dir / 'results.json'}"))
    sys.exit(outcome.exit_code)


@cli.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False, path_type=Path))
@handle_errors
def validate(spec_path: Path) -> None:
    """Check SPEC without running anything: structure, every plugin's params, that input
    paths exist, and that the model gives what the attacks need (when its loader says)."""
    from medaudit.audits.plan import check_model_access, plan_jobs
    from medaudit.core.spec import load_spec

    host = _host()
    spec = load_spec(spec_path, host)
    check_model_access(spec, host)
    click.echo(printable(f"{spec_path}: valid; {len(plan_jobs(spec, host))} jobs planned"))
    if "pdf" in spec.report.formats:
        from medaudit.reports.pdf import find_chromium

        if find_chromium() is None:
            click.secho("warning: report.formats asks for pdf but no Chromium is found here; "
                        "`medaudit run` will refuse to start on this machine", fg="yellow", err=True)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of components (for scripts and CI).")
@handle_errors
def plugins(as_json: bool) -> None:
    """List plugins and the components they provide, with their params."""
    host = _host()
    rows = host.component_rows()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for kind in host.components:
        click.secho(f"{kind}s:", bold=True)
        for row in (r for r in rows if r["kind"] == kind):
            params = ", ".join(row["params"].get("properties", {})) or "no params"
            click.echo(f"  {row['name']:<24} {row['summary']}")
            click.echo(f"  {'':<24} params: {params}; from {row['distribution'] or row['plugin']} {row['version'] or ''}")


@cli.command()
@click.option("--results", is_flag=True, help="Print the JSON Schema of results.json instead.")
@handle_errors
def schema(results: bool) -> None:
    """Print the JSON Schema of audit specs, with every registered plugin's params (--results: of results.json)."""
    if results:
        from medaudit.audits.results_schema import results_json_schema

        click.echo(json.dumps(results_json_schema(), indent=2))
        return
    from medaudit.core.spec import spec_json_schema

    click.echo(json.dumps(spec_json_schema(_host()), indent=2))


@cli.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path), default="audit.yaml")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@handle_errors
def init(path: Path, force: bool) -> None:
    """Write a commented starter spec to PATH (default audit.yaml)."""
    if path.exists() and not force:
        raise MedauditError(f"{path} exists; use --force to overwrite it")
    try:
        path.write_text(STARTER_SPEC.read_text(encoding="utf-8"), encoding="utf-8")
    except OSError as exc:
        raise MedauditError(f"{path}: cannot write ({exc.strerror}); name a file in an existing, writable folder") from None
    click.echo(printable(f"wrote {path}; check it with: medaudit validate {path}"))


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--pdf", is_flag=True, help="Also print report.html to report.pdf (needs Chromium; see MEDAUDIT_CHROMIUM).")
@click.option("--figures", "explaining", default="", metavar="NAMES",
              help="Draw these model-explaining figures now (comma-separated: grad_cam, embedding), e.g. for a run "
                   "made with report.figures: []; loads the audited model from the run's resolved spec.")
@handle_errors
def report(run_dir: Path, pdf: bool, explaining: str) -> None:
    """Re-render RUN_DIR/report.html and junit.xml from its results.json, without rerunning."""
    from medaudit.reports.html import write_report
    from medaudit.reports.junit import write_junit

    results_path = run_dir / "results.json"
    if not results_path.is_file():
        raise MedauditError(f"{run_dir}: no results.json (the run did not finish; resume it with medaudit run SPEC --resume {run_dir})")
    names = [n.strip() for n in explaining.split(",") if n.strip()]
    from medaudit.audits.figures import EXPLAINING

    if unknown := [n for n in names if n not in EXPLAINING]:
        raise click.BadParameter(f"no figure {', '.join(unknown)}; choose from {', '.join(EXPLAINING)}",
                                 param_hint="--figures")
    if pdf:
        from medaudit.reports.pdf import require_chromium, write_pdf

        require_chromium()  # before touching anything
    results = json.loads(results_path.read_text(encoding="utf-8"))
    if names:
        from medaudit.audits.rundir import json_text, write_atomic
        from medaudit.reports.later import draw_explaining_figures

        added = draw_explaining_figures(run_dir, results, _host(), names)
        click.echo(f"figures: {', '.join(f['path'] for f in added) or 'none could be drawn (see the log)'}")
        write_atomic(results_path, json_text(results))
    path = write_report(results, run_dir, _host())
    write_junit(results, run_dir)
    click.echo(f"report: {path}")
    if pdf:
        click.echo(f"pdf: {write_pdf(run_dir)}")


@cli.command()
@click.argument("run_a", metavar="RUN_A")
@click.argument("run_b", metavar="RUN_B")
@click.option("-o", "--output-dir", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for comparison.json and comparison.html (default: RUN_B/comparison).")
@click.option("--confidence", type=click.FloatRange(0.5, 1, min_open=True, max_open=True), default=0.95, show_default=True,
              help="Confidence level of the intervals; a change is significant when p < 1 - confidence.")
@click.option("--index", type=click.Path(dir_okay=False, path_type=Path), default=Path("runs") / "history.sqlite",
              show_default=True, help="The history index that report ids and latest:<audit> are looked up in.")
@handle_errors
def compare(run_a: str, run_b: str, out_dir: Path | None, confidence: float, index: Path) -> None:
    """Compare two finished runs, each a run directory, a report id or latest:<audit>: every
    metric both report, B minus A with its interval, paired case by case when both saw the same data."""
    from medaudit.audits.history import resolve_run
    from medaudit.reports.compare import write_comparison

    a, b = resolve_run(run_a, index), resolve_run(run_b, index)
    _, html_path = write_comparison(a, b, out_dir or b / "comparison", _host(), confidence)
    result = json.loads((html_path.parent / "comparison.json").read_text(encoding="utf-8"))
    s = result["summary"]
    pairing = "paired case by case" if result["paired"] else f"unpaired: {result['paired_reason']}"
    click.echo(printable(f"{s['compared']} values compared, {s['tested']} tested ({pairing}): "
                         f"{s['significant_worse']} significantly worse, {s['significant_better']} significantly better",
                         one_line=True))
    click.echo(printable(f"comparison: {html_path}"))


@cli.command()
@click.option("--index", "index", type=click.Path(dir_okay=False, path_type=Path), default=Path("runs") / "history.sqlite",
              show_default=True, help="The history index (runtime.history under runtime.output_dir).")
@click.option("--audit", help="Only this audit's runs.")
@click.option("--json", "as_json", is_flag=True, help="Print the runs as a JSON list (for scripts and CI).")
@click.option("--rebuild", "rebuild_dir", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="First index every finished run directory under this folder again (the index is only a cache of them).")
@handle_errors
def history(index: Path, audit: str | None, as_json: bool, rebuild_dir: Path | None) -> None:
    """List the finished audits in the history index, oldest first."""
    from medaudit.audits import history as audit_history

    if rebuild_dir is not None:
        count, skipped = audit_history.rebuild(rebuild_dir, index)
        for line in skipped:
            click.secho(printable(f"warning: left out {line}", one_line=True), fg="yellow", err=True)
        click.echo(printable(f"indexed {count} runs from {rebuild_dir} in {index}"), err=True)
    rows = audit_history.runs(index, audit)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(printable(f"no runs{f' of {audit}' if audit else ''} in {index}"
                             + ("" if index.is_file() else " (no index yet: run an audit, or --rebuild FOLDER)")))
        return
    for row in rows:
        shown = [k for k in row["headline"] if "[none" in k]
        shown = shown[:1] + [k for k in shown if "@" in k][-1:]  # clean, and the worst case at the largest budget
        numbers = ", ".join(f"{k} {row['headline'][k]:.3f}" for k in shown if row["headline"][k] is not None)
        click.echo(printable(f"{row['report_id']}  {row['finished'] or '?':<20}  {row['verdict'] or '?':<12} "
                             f"{row['audit']}  {numbers}", one_line=True))
        click.echo(printable(f"{'':<15} {row['run_dir']}", one_line=True))


def main() -> None:
    cli()
