"""User-facing errors: the CLI prints these as one line, without a traceback."""


class DfmlError(Exception):
    """A problem the user can fix (bad input, missing data, unknown name); message says how."""


class DatasetError(DfmlError):
    """A dataset root is missing or not in the expected format."""


class ConfigError(DfmlError):
    """A recipe or run config is invalid."""


class CheckpointError(DfmlError):
    """A teacher or model file is missing, truncated or does not match its manifest."""
