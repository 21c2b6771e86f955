"""SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C): finish the step, save, exit non-zero.

Lightning turns SIGTERM into a flag that its loops check at the end of each training batch, where
they raise `SIGTERMException`, an exit with status 0 and no checkpoint. Here SIGINT sets the same
flag (a second Ctrl-C quits at once, unsaved), the callback saves `last.ckpt` in the checkpoint
folder when the exception passes (the end of a step is a safe point: rollouts, updates and
counters all done), and the CLI exits with 128 + the signal's number (143 for SIGTERM, 130 for
SIGINT) after one line naming the checkpoint. `--ckpt_path last` resumes from it.

Under SLURM with Lightning's auto-requeue, Lightning saves `hpc_ckpt_N.ckpt` and requeues the job
from inside its SIGUSR1 handler, that is in the middle of whatever the step was doing; here that
handler is deferred to the same safe point, and the requeued job resumes from it on its own.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """A run stopped by a signal; `exit_status` is 128 + the signal's number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_status = 128 + signum


class PreemptionCheckpoint(Callback):
    """On SIGTERM or SIGINT during `fit`: save a resumable `last.ckpt` after the current step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.checkpoint: Path | None = None
        self.step: int | None = None
        self._requeue: tuple[int, object] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.signum, self.checkpoint, self.step = None, None, None
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in SIGNALS:  # Lightning's own handlers are restored when fit ends
            signal.signal(signum, self._handler(trainer, signum, signal.getsignal(signum)))
        self._requeue = None
        requeue = _requeue_signal(trainer)
        if requeue is not None and callable(signal.getsignal(requeue)):
            self._requeue = (requeue, signal.getsignal(requeue))
            signal.signal(requeue, self._handler(trainer, requeue, None))

    def _handler(self, trainer: pl.Trainer, signum: int, previous: object):
        def handle(received: int, frame) -> None:
            if self.signum is not None and received == signal.SIGINT:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt  # a second Ctrl-C: quit now, without saving
            if self.signum is None:
                self.signum = received
                if trainer.is_global_zero:
                    print(
                        f"vpd_lightning: {signal.Signals(received).name} received: finishing step "
                        f"{trainer.global_step + 1}, then saving a checkpoint and stopping",
                        file=sys.stderr,
                        flush=True,
                    )
            if received == signal.SIGTERM and callable(previous):
                previous(received, frame)  # Lightning's: sets the flag, tells launched processes
            else:
                trainer._signal_connector.received_sigterm = True

        return handle

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        self.step = trainer.global_step
        if self._requeue is not None and self.signum == self._requeue[0]:
            requeue, lightning_handler = self._requeue
            connector = trainer._checkpoint_connector
            self.checkpoint = Path(connector.hpc_save_path(trainer.default_root_dir))
            lightning_handler(requeue, None)  # saves there and requeues the job
            return
        self.checkpoint = last_checkpoint_path(trainer)
        trainer.save_checkpoint(self.checkpoint)  # every process: a sharded save is collective

    def stopped(self, trainer: pl.Trainer) -> Preempted:
        """The exception the CLI turns into its last line and exit status."""
        signum = self.signum or signal.SIGTERM
        name = signal.Signals(signum).name
        if self.checkpoint is None:
            return Preempted(f"stopped by {name} outside training: no checkpoint saved", signum)
        return Preempted(
            f"stopped by {name} after step {self.step} of {trainer.max_steps}: resumable "
            f"checkpoint {self.checkpoint}; resume with --ckpt_path {self.checkpoint}",
            signum,
        )


def _requeue_signal(trainer: pl.Trainer) -> int | None:
    """SLURM's requeue signal when Lightning auto-requeues this job, else None."""
    environment = trainer._accelerator_connector.cluster_environment
    if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
        return environment.requeue_signal
    return None


def last_checkpoint_path(trainer: pl.Trainer) -> Path:
    """`last.ckpt` in the checkpoint callback's folder, else in `<log dir>/checkpoints`."""
    callback = trainer.checkpoint_callback
    name = ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION
    if isinstance(callback, ModelCheckpoint) and callback.dirpath:
        return Path(callback.dirpath) / name
    return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints" / name
