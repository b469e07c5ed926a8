"""A Keras callback for tests/test_executor.py, importable by a Ray worker as
``tests.executor_helpers.KillOnce`` (a ``training.callbacks`` class)."""
from __future__ import annotations

import os
import signal

import keras


class KillOnce(keras.callbacks.Callback):
    """Appends ``<pid> <epoch>`` to ``log`` at every epoch's start; at the start of
    epoch ``at_epoch`` the first process to create ``flag`` kills itself with
    SIGKILL, as a lost node or the kernel's OOM killer would (the epochs before
    it are checkpointed; a pre-existing ``flag`` disarms it)."""

    def __init__(self, flag: str, log: str, at_epoch: int = 2):
        super().__init__()
        self.flag, self.log, self.at_epoch = flag, log, int(at_epoch)

    def on_epoch_begin(self, epoch, logs=None):
        with open(self.log, "a") as fh:
            fh.write(f"{os.getpid()} {int(epoch)}\n")
        if int(epoch) != self.at_epoch:
            return
        try:
            fd = os.open(self.flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)
