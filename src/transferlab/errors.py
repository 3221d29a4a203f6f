"""Errors that reach the user as one clear line instead of a traceback."""


class TransferlabError(Exception):
    """Base class: the CLI prints `ClassName: message` and exits non-zero."""


class ConfigError(TransferlabError):
    """A composed config has an unknown key, a wrong type or an out-of-range value."""


class DataError(TransferlabError):
    """Input data is missing, stale, corrupt or unsuitable."""


class DownloadError(TransferlabError):
    """A dataset source could not be fetched, verified or extracted."""


class ModelError(TransferlabError):
    """A model or its weights could not be built or loaded."""
