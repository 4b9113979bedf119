"""Exceptions for user mistakes.

Every error a user can cause by a recipe, an override or a data folder derives from `UserError`.
The command line prints its message on one line and exits with code 2, without a traceback; anything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the input (config, data, checkpoint) that the user can fix."""

    exit_code = 2


class ConfigError(UserError):
    """A recipe or override names an unknown key, a wrong type or an impossible value."""


class DataError(UserError):
    """Data is missing, empty, unreadable, or does not fit the config."""


class CheckpointError(UserError):
    """A checkpoint cannot be read, or the output folder holds a different run."""


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""

    exit_code = 3


class RunFolderBusy(CheckpointError):
    """Another live process trains in the run folder (it holds the folder's lock)."""


class UntrustedCode(CheckpointError):
    """A run folder or export names Python modules that the user has not allowed it to import."""
