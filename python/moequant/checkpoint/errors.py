"""Errors raised while reading a source checkpoint."""

from ..errors import UserError


class CheckpointError(UserError):
    """The source checkpoint is unsupported, inconsistent or damaged. The message names
    the file and tensor concerned; the CLI turns it into exit code 2."""
