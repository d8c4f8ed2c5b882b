"""Errors a user can cause.

Anything raised as `UserError` is a problem with the user's input (a bad path, an unknown model,
inconsistent sizes). The CLI prints its message as one line on stderr and exits with code 2;
anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """A problem with the user's input, explained in one line."""


class TrainingStopped(RuntimeError):
    """A run that cannot go on (e.g. non-finite losses in a row); the message says why and what
    was kept. The CLI prints it as one line and exits with code 1."""
