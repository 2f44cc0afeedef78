"""The one error type for bad user input (arguments, files, checkpoints, recipes,
destinations). Its message names the file, tensor, key or argument concerned; the CLI
prints it on one line and exits with code 2. Failures while running (a full disk) are
other exceptions and exit 1."""


class UserError(ValueError):
    """Bad input from the user: printed without a traceback, exit code 2."""

    # True when the message already went to stderr (every rank of a distributed run
    # prints before a barrier, so that none is terminated before it has spoken).
    printed = False


def reported(msg: str) -> UserError:
    e = UserError(msg)
    e.printed = True
    return e
