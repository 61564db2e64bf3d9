"""The errors a user can cause: each message says what to do. Every entry point catches
:data:`USER_ERRORS` before any distributed work and exits with status 2."""
from __future__ import annotations


class UserError(ValueError):
    """Something a user gave (a config, an option, a data folder) that cannot run."""


class ConfigError(UserError):
    """A configuration a user gave that cannot run; the message says what to do."""


class DataError(UserError):
    """A problem with the data a user pointed at; the message says what to do."""


# What the entry points report as "error: ..." (exit 2) instead of a traceback.
USER_ERRORS = (UserError, FileNotFoundError, ValueError)
