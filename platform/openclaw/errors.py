"""One hierarchy of typed, picklable errors. Each message says what is wrong and what to change.

`UserError` subclasses are mistakes in the user's config or data: the CLI prints them as one paragraph
and exits 2 (no traceback unless ``--debug``). Everything else is a bug or an infrastructure failure.
"""
from __future__ import annotations


class OpenClawError(Exception):
    """Base of every error openclaw raises on purpose."""

    final = False
    """A retry of the attempt would fail alike (the config cannot work; a non-finite loss under `fail`, which
    the replay from the checkpoint meets again): a worker group that raises it is not started again."""

    def __reduce__(self):  # picklable across Ray process boundaries, whatever the subclass signature
        return (self.__class__, self.args)


class UserError(OpenClawError):
    """Bad input from the user: config, data or command line. Exit code 2."""


class ConfigError(UserError):
    """The config file or an override is malformed, has an unknown key or a bad value."""

    final = True


class DataError(UserError):
    """A dataset path, shard or column is missing or does not match the config."""


class CheckpointError(OpenClawError):
    """A checkpoint is missing, truncated or fails its manifest check."""


class NonFiniteLossError(OpenClawError):
    """The loss or the gradient norm became NaN or infinite."""

    final = True


class WorkerPreempted(OpenClawError):
    """A training worker got SIGTERM; it checkpointed first, and Ray Train restarts the group from there."""


class RunStopped(OpenClawError):
    """The driver was asked to stop (SIGTERM, Ctrl-C); the run checkpointed and can be resumed."""

    def __init__(self, message: str, signal_name: str = "SIGTERM"):
        super().__init__(message)
        self.signal_name = signal_name
        """The signal that asked: "SIGTERM" or "SIGINT" (Ctrl-C); the CLI exits with 128 + its number."""


class Terminated(KeyboardInterrupt):
    """SIGTERM where no graceful stop is set up (before training starts, or a second one): raised in the
    main thread like Ctrl-C's KeyboardInterrupt, so that the run is closed and Ray shut down on the way out."""


class UntrustedCodeError(UserError):
    """A checkpoint, logged model or spool names code that loading it would import and run, and the user
    has not said to trust it."""

    final = True


class FailureBudgetSpent(OpenClawError):
    """The run failed more often than its `failure` settings allow; the message names the budget and the
    latest error."""


class CompileError(UserError):
    """`torch.compile` failed on the model (`train.compile`); the message says how to train without it."""

    final = True


class MemoryBudgetError(UserError):
    """`train.micro_batch_size: auto` found no micro-batch that fits the memory; the message says what
    to shard, recompute or raise."""

    final = True
