"""Errors mer reports to users: each carries a one-line message naming what and where.

The CLI prints `error: <message>` for any `MerError` and exits 1; anything
else is a bug and keeps its traceback.
"""


class MerError(Exception):
    """Base of every error meant for the user."""


class ConfigError(MerError):
    """A model or run configuration is invalid or unsupported."""


class StoreError(MerError):
    """An expert store is missing, truncated, corrupted or of an unknown version."""


class ConvertError(MerError):
    """A source checkpoint cannot be converted."""


class BudgetError(MerError):
    """A memory budget is too small for what must be resident."""


class ExpertReadError(StoreError):
    """Reading one expert from the store failed."""


class ClusterError(MerError):
    """Expert workers cannot start, or stopped answering (`mer.cluster`)."""
