"""Errors a user can act on.

Entry scripts catch `UserError` and print its message without a traceback; anything
else is a bug in this repo and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input from the user: the message names the file, key or value and what to do."""


class ConfigError(UserError):
    """A config file or override is wrong."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the user pointed at does not exist."""
