"""Errors that users see: each names the culprit and what to do about it."""


class UserError(Exception):
    """Bad input or configuration. The CLI prints the message without a traceback and exits 2."""


class ConfigError(UserError):
    """A configuration value that cannot work (unknown axis value, budget too small, ...)."""


class DataError(UserError):
    """A collection on disk that is missing or malformed (file, line and problem in the message)."""
