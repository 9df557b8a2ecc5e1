"""Save a checkpoint and stop when the job is about to lose its slot (SIGUSR1 or SIGTERM).

On a SLURM cluster, ``slurm/train.sbatch`` asks for SIGUSR1 ten minutes before the time limit and
forwards it to the training processes; a preempted job gets SIGTERM. Either way the signal handler
only sets a flag. At the next optimizer-step end every rank learns whether *any* rank got a signal
(one all-reduce of a single number), and then all of them save a checkpoint of that step and stop —
the same step everywhere, so no rank is left waiting alone in a collective. The checkpoint is
complete (marker written) like any other (:mod:`anllm.train.checkpoints`). Then the process exits
(``SystemExit(0)`` once training has ended), skipping what follows a finished run: no final weights,
no summary, so an interrupted run never looks finished (and the minutes before a time limit are not
spent gathering weights). A relaunch with ``trainer.resume=auto`` (the default) continues from the
checkpoint; ``slurm/train.sbatch`` requeues the job for that. ``exit_code=None`` returns normally
instead (``anllm.train.run`` then saves the weights and the summary of the interrupted run).

A second SIGTERM does what SIGTERM did before (the previous handler, by default: terminate). The
handlers are restored when training ends. A forked child (a DataLoader worker) that inherited the
handler ignores SIGUSR1 and dies on SIGTERM as it would have without it.

Registered in :func:`anllm.train.runner.run`; ``PreemptionCallback(signals=...)`` picks other signals.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import threading
import weakref
from pathlib import Path
from typing import Any, Iterable

from transformers import TrainerCallback

from .checkpoints import MARKER, PREFIX

logger = logging.getLogger("anllm.train")

DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def _dispatch(ref: "weakref.ref[PreemptionCallback]", pid: int, previous: Any, signum: int, frame: Any) -> None:
    """The installed handler. Holds the callback weakly: once training is over (or crashed and its
    Trainer is gone) the signal gets its previous behaviour back."""
    cb = ref()
    if os.getpid() != pid or cb is None or not cb.active:
        if signum == signal.SIGUSR1 and os.getpid() != pid:
            return  # a forked child: the parent process handles it
        _reraise(signum, previous, frame)
        return
    if cb.received is not None and signum == signal.SIGTERM:
        _reraise(signum, previous, frame)  # asked twice: stop now
        return
    if cb.received is None:
        cb.received = signum
    if _is_dispatch(previous):
        previous(signum, frame)  # another PreemptionCallback installed earlier hears it too


def _is_dispatch(handler: Any) -> bool:
    return isinstance(handler, functools.partial) and handler.func is _dispatch


def _reraise(signum: int, previous: Any, frame: Any) -> None:
    if callable(previous):
        previous(signum, frame)
        return
    if previous == signal.SIG_IGN:
        return
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


class PreemptionCallback(TrainerCallback):
    """On ``signals`` (default SIGUSR1, SIGTERM): save a checkpoint at the next optimizer step and stop.

    ``received`` is the first signal number seen in this process (None until then); ``stopped_at`` the
    global step at which training was stopped for a signal (None if it was not). After such a stop the
    process exits with ``exit_code`` when training ends (None: return normally).
    """

    def __init__(self, signals: Iterable[int] = DEFAULT_SIGNALS, exit_code: int | None = 0):
        self.signals = tuple(signal.Signals(s) for s in signals)
        self.exit_code = exit_code
        self.received: int | None = None
        self.stopped_at: int | None = None
        self.active = True
        self._previous: dict[int, Any] = {}
        self._install()

    # --- handlers ---------------------------------------------------------------------------------

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("PreemptionCallback created outside the main thread: no signal handlers installed "
                           "(a time-limit signal will not save a checkpoint).")
            return
        pid, ref = os.getpid(), weakref.ref(self)
        for sig in self.signals:
            previous = signal.getsignal(sig)
            self._previous[sig] = previous
            signal.signal(sig, functools.partial(_dispatch, ref, pid, previous))

    def restore(self) -> None:
        """Put the previous handlers back (called at the end of training)."""
        self.active = False
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self._previous.items():
            current = signal.getsignal(sig)
            if _is_dispatch(current) and current.args[0]() is self:
                # skip handlers of other PreemptionCallbacks that have ended meanwhile
                while _is_dispatch(previous) and (previous.args[0]() is None or not previous.args[0]().active):
                    previous = previous.args[2]
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    # --- TrainerCallback ----------------------------------------------------------------------------

    def on_step_end(self, args, state, control, **kwargs):
        if self._any_rank_received():
            if self.stopped_at is None:
                name = signal.Signals(self.received).name if self.received else "a signal on another rank"
                logger.warning("Got %s: saving checkpoint-%d and stopping; a relaunch with trainer.resume=auto "
                               "continues from it.", name, state.global_step)
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
            if state.is_world_process_zero:  # the save may rewrite an older checkpoint-N: unmark it first
                (Path(args.output_dir) / f"{PREFIX}{state.global_step}" / MARKER).unlink(missing_ok=True)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()
        if self.stopped_at is not None and self.exit_code is not None:
            logger.warning("Stopped for a signal at step %d (checkpoint-%d is complete): exiting without the final "
                           "weights; the next start resumes from the checkpoint.", self.stopped_at, self.stopped_at)
            raise SystemExit(self.exit_code)
        return control

    def _any_rank_received(self) -> bool:
        mine = self.received is not None
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return mine
        import torch

        device = torch.device("cpu")
        if "nccl" in str(dist.get_backend()) and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        flag = torch.tensor([1 if mine else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
