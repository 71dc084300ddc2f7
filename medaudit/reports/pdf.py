"""report.pdf: report.html printed to PDF by a headless Chromium.

Chromium is an optional system dependency (Debian: ``apt-get install chromium``), found
through ``MEDAUDIT_CHROMIUM`` or on ``PATH``. The report has no scripts and a strict
Content-Security-Policy, so printing it makes no requests; the browser runs with a
throw-away profile and its background services off. The print layout comes from the
``@media print`` rules of report.html.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from medaudit.core.errors import MedauditError

#: Environment variable naming the Chromium (or Chrome) executable to use.
ENV_VAR = "MEDAUDIT_CHROMIUM"
#: Executables looked for on PATH, in this order, when ``MEDAUDIT_CHROMIUM`` is not set.
CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
#: Flags for a quiet, self-contained headless browser. ``--no-sandbox`` because Chromium
#: refuses to start as root (CI containers) otherwise; it only ever opens our own report.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--mute-audio",
)
INSTALL_HINT = (
    "install Chromium (Debian/Ubuntu: apt-get install chromium) or set "
    f"{ENV_VAR} to the path of a Chromium or Chrome executable"
)


def find_chromium() -> str | None:
    """The Chromium executable to use, or None.

    ``MEDAUDIT_CHROMIUM`` wins when set (a path or a command name); there is no fallback
    to PATH then, so a wrong value is reported rather than silently replaced.
    """
    configured = os.environ.get(ENV_VAR, "").strip()
    if configured:
        return shutil.which(configured)
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def require_chromium() -> str:
    """:func:`find_chromium`, or a :class:`MedauditError` saying how to get one."""
    path = find_chromium()
    if path is not None:
        return path
    configured = os.environ.get(ENV_VAR, "").strip()
    if configured:
        raise MedauditError(f"cannot write report.pdf: {ENV_VAR}={configured!r} is not an executable; {INSTALL_HINT}")
    raise MedauditError(
        f"cannot write report.pdf: no Chromium found on PATH (looked for {', '.join(CANDIDATES)}); {INSTALL_HINT}"
    )


def _tail(text: bytes, lines: int = 5) -> str:
    kept = [line.strip() for line in text.decode("utf-8", "replace").splitlines() if line.strip()]
    return " | ".join(kept[-lines:]) or "no output"


def _kill(proc: subprocess.Popen) -> None:
    """Stop Chromium and the helper processes it started (its own process group)."""
    try:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, signal.SIGKILL)
        else:  # pragma: no cover - Windows
            proc.kill()
    except ProcessLookupError:
        pass
    proc.communicate()


def write_pdf(run_dir: Path, *, timeout: float = 120.0) -> Path:
    """Print ``run_dir/report.html`` to ``run_dir/report.pdf`` (A4, no header or footer).

    Written to a temporary file in ``run_dir`` and moved into place, so a failed or
    interrupted print never leaves half a PDF. Raises :class:`MedauditError` when Chromium
    is missing, fails, times out or writes no PDF.
    """
    run_dir = Path(run_dir)
    html = run_dir / "report.html"
    if not html.is_file():
        raise MedauditError(f"cannot write report.pdf: {html} does not exist")
    chromium = require_chromium()
    target = run_dir / "report.pdf"
    fd, tmp_name = tempfile.mkstemp(dir=run_dir, prefix=".report.", suffix=".pdf.tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with tempfile.TemporaryDirectory(prefix="medaudit-chromium-", ignore_cleanup_errors=True) as profile:
            command = [
                chromium, *FLAGS, f"--user-data-dir={profile}", f"--print-to-pdf={tmp}",
                "--no-pdf-header-footer", "--print-to-pdf-no-header",  # the second for Chromium before 111
                html.resolve().as_uri(),
            ]
            try:
                proc = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    start_new_session=True,
                )
            except OSError as exc:
                raise MedauditError(f"cannot write report.pdf: could not start {chromium}: {exc}") from None
            try:
                stdout, stderr = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill(proc)
                raise MedauditError(f"cannot write report.pdf: {chromium} did not finish within {timeout:g} s") from None
            except BaseException:
                _kill(proc)
                raise
        with open(tmp, "rb") as f:
            head = f.read(5)
        if proc.returncode != 0 or head != b"%PDF-":
            why = f"exit code {proc.returncode}" if proc.returncode != 0 else "no PDF was written"
            raise MedauditError(f"cannot write report.pdf: {chromium} failed ({why}): {_tail(stderr or stdout)}")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be shared
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
