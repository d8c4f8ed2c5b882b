"""Errors a user can cause, and the ways a run stops.

Anything raised as `UserError` is a problem with the user's input (a bad path, an unknown model,
inconsistent sizes). The CLI prints its message as one line on stderr and exits with code 2;
anything else is a bug and keeps its traceback.

Library code names the parameters a message is about as the library calls them, in backticks
(`` `num_images` must be positive ``), and lists them in `params`; the CLI shows each as its flag
(`--num-images must be positive`, `as_flags`), as does the training loop for the warnings it prints.
"""


class _Reported(Exception):
    """An error the CLI reports as one line. `shared=True` marks one that every rank raised
    together after agreeing on it (bad data counted over all ranks, a failed save): only rank 0
    reports it. `params` are the parameters the message names (each written `name` in it)."""

    def __init__(self, message: str, *, shared: bool = False, params: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.shared = shared
        self.params = params


class UserError(_Reported, ValueError):
    """A problem with the user's input, explained in one line (exit code 2)."""


class TrainingStopped(_Reported, RuntimeError):
    """A run that cannot go on (e.g. non-finite losses in a row); the message says why and what
    was kept. The CLI prints it as one line and exits with code 1."""


class OversmoothingStopped(_Reported, RuntimeError):
    """The over-smoothing alarm stopped a run (`--oversmoothing-action stop`) after it saved a
    checkpoint; the message says why. The CLI exits with `EXIT_OVERSMOOTHED`."""


class StoppedBySignal(Exception):
    """Every rank stopped together after a stop signal, with a checkpoint where there was work to
    keep; the message says where and how to resume. The CLI exits with `EXIT_STOPPED`."""


class Terminated(BaseException):
    """A stop signal ended a command with nothing to keep (`eval`, `analyze`) where it was. A
    BaseException, as KeyboardInterrupt is, so that no `except Exception` on the way swallows it.
    The CLI prints its message as one line and exits with `EXIT_STOPPED`."""


#: Library parameters whose flag is not `--` and the parameter's name in kebab case.
FLAG_NAMES = {"model_name": "--model"}


def flag_name(param: str) -> str:
    return FLAG_NAMES.get(param, "--" + param.replace("_", "-"))


def as_flags(error: BaseException) -> str:
    """The error's message with each parameter it names (`error.params`, written `name` in the
    message) shown as its flag."""
    message = str(error)
    for param in getattr(error, "params", ()):
        message = message.replace(f"`{param}`", flag_name(param))
    return message
