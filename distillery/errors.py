"""The one base of every error distillery reports to its user: a message that says what was wrong and what to do,
and the exit status the CLI gives for it. Each layer raises its own subclass (ConfigError, DataError, ModelError,
TrackingError, VersioningError, ValidationFailed, GateError, LineageError, PrefectUnavailable)."""

from __future__ import annotations


class DistilleryError(Exception):
    """A failure the user can act on, reported in one line (no traceback) with ``exit_code``."""

    exit_code: int = 2
