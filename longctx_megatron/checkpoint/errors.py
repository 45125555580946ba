"""The one error of the checkpoint package, so callers can tell a bad checkpoint from a bug."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupt or does not fit the model; the message says which."""
