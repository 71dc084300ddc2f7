"""Errors a user can fix, and the process exit codes they map to.

Plugins raise these (never bare ``Exception``) for problems the user can act on; the CLI
prints them as one line without a traceback.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Exit codes of ``medaudit run``, modelled on pytest's public set."""

    PASS = 0  #: every blocking acceptance criterion held
    FAIL = 1  #: the audit ran and a blocking criterion failed
    INTERRUPTED = 2  #: stopped (Ctrl-C, SIGTERM, SIGHUP); the run directory is resumable
    INTERNAL_ERROR = 3  #: a bug or an unrecoverable fault (out of memory, the audited model's own code raised)
    USAGE_ERROR = 4  #: bad command line, spec, input or checkpoint; a read-only or full output folder
    NO_DATA = 5  #: nothing to evaluate (no criteria, or zero cases)
    INCONCLUSIVE = 6  #: a blocking criterion could not be decided (too few cases)
    INVALID = 7  #: a gating validity check failed: the numbers cannot support a claim


class MedauditError(Exception):
    """Base class of every error shown to the user as a single line."""

    exit_code = ExitCode.USAGE_ERROR


class SpecError(MedauditError):
    """The audit spec is malformed; ``problems`` holds one line per error."""

    def __init__(self, problems: list[str], source: str = "spec"):
        self.problems = list(problems)
        self.source = source
        n = len(self.problems)
        head = f"{source}: {n} error{'s' if n != 1 else ''}"
        super().__init__(head + "\n" + "\n".join(f"  {p}" for p in self.problems))


class PluginError(MedauditError):
    """A plugin is broken or two plugins clash; raised at start-up."""


class ModelLoadError(MedauditError):
    """A model could not be built or its weights do not fit."""


class DataError(MedauditError):
    """A dataset could not be read or does not fit the model."""


class ResumeError(MedauditError):
    """A run directory cannot be resumed with this spec."""


class RunDirError(MedauditError):
    """The run directory named on the command line cannot be used (it holds files, and
    ``--force`` was not given or the folder is not an earlier run)."""


class EnvironmentProblem(MedauditError):
    """The Python environment is broken (for example torch and torchvision do not match)."""


class OutputError(MedauditError):
    """The run's files cannot be written: the output folder is read-only, or the disk is full."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP during ``medaudit run``, raised by its signal handler so that the run
    stops the way Ctrl-C stops it (a ``KeyboardInterrupt``), naming the signal."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


class PrivacyError(MedauditError):
    """An output would have contained a value that could identify a patient."""


class ModelRejected(MedauditError):
    """The model runs, but its outputs cannot be audited: NaN or Inf, or probabilities
    instead of logits (found by the load-time probe, before the run directory exists)."""


class ModelUnstable(MedauditError):
    """The model is not one fixed function: two identical forward passes differ, or it
    changes its own weights. Robustness numbers of such a model support no claim."""

    exit_code = ExitCode.INVALID


class OutOfMemory(MedauditError):
    """Out of memory even at batch size 1: the run stops, resumable, with advice."""

    exit_code = ExitCode.INTERNAL_ERROR


class ModelRaised(MedauditError):
    """The audited model's own code raised during a job: the message names the model, the
    job, the cases of the batch and the model's frame; the run directory stays resumable."""

    exit_code = ExitCode.INTERNAL_ERROR
