"""Errors a user can cause and fix themselves.

Anything raised as a `UserError` is shown by the CLI as one line (`error: ...`) with exit code 2,
instead of a traceback: a bad config key, an unknown name, a missing file, a non-finite loss.
"""


class UserError(Exception):
    """A mistake in the user's input; the message says what is wrong and how to fix it."""


class ConfigError(UserError):
    """A malformed or invalid configuration."""


class DataError(UserError):
    """A dataset that is missing or not in the expected layout."""


class CheckpointError(UserError):
    """A checkpoint that is missing, unsafe, or does not fit the model."""


class TrainingError(UserError):
    """Training cannot go on (for example a non-finite loss)."""


def require(ok: bool, key: str, message: str) -> None:
    """Raise `ConfigError("<key> <message>")` unless `ok`: the one-line form of every config check."""
    if not ok:
        raise ConfigError(f"{key} {message}")
