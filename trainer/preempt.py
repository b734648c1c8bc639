"""Stop training cleanly when a scheduler asks: save at the next step boundary, then exit 75.

    from trainer.preempt import StopRequest, TrainingStopped
    stop = StopRequest.from_env().install()     # handlers only where MARKERLAB_STOP_SIGNALS names signals
    try:
        while step < total:
            ...one optimizer step...
            if stop.signal:                     # the signal's name, once one arrived
                save the checkpoint; raise TrainingStopped(...)
    finally:
        stop.restore()                          # (also usable as `with StopRequest(...) as stop:`)

Under SLURM (trainer/executors.py) a member's process starts with MARKERLAB_STOP_SIGNALS=USR2,TERM
and both signals *ignored*, an ignored disposition that every process it starts inherits: vLLM's
engine process and any DataLoader worker keep running through SLURM's warning (USR2 before the time
limit, or a preemption notice) and through the SIGTERM that precedes a requeue or a cancel. Only the
training loop listens, for as long as it runs: the handler merely notes the signal, the loop finishes
the step it is in, saves a checkpoint (the same state a periodic checkpoint holds, so the run resumes
bit for bit) and stops with TrainingStopped, exit status 75 (EX_TEMPFAIL). SLURM then requeues the job
or ends it; running the same command again continues from that checkpoint. Outside the loop the
signals stay ignored, and SLURM's SIGKILL after KillWait ends what is left (an evaluation resumes from
its finished parts).

Without the variable (every run outside SLURM) nothing is installed: Ctrl-C is KeyboardInterrupt and
SIGTERM ends the process, as always.
"""

from __future__ import annotations

import os
import signal
import threading

from markerlab.errors import UserError

STOP_SIGNALS_ENV = "MARKERLAB_STOP_SIGNALS"
STOPPED_EXIT = 75  # EX_TEMPFAIL: stopped on request with its state saved; the same command resumes


class TrainingStopped(UserError):
    """Training saved a checkpoint and stopped because a stop signal arrived (exit status 75)."""

    exit_code = STOPPED_EXIT


def parse_signals(text: str) -> tuple[signal.Signals, ...]:
    """'USR2,TERM' -> (SIGUSR2, SIGTERM); an unknown name is a UserError naming the variable."""
    out = []
    for name in (x.strip().upper() for x in text.split(",")):
        if not name:
            continue
        sig = getattr(signal.Signals, name if name.startswith("SIG") else "SIG" + name, None)
        if sig is None:
            raise UserError(f"{STOP_SIGNALS_ENV}: unknown signal {name!r} (expected names such as USR2,TERM)")
        out.append(sig)
    return tuple(out)


class StopRequest:
    """For a `with` block: note the first of `signals` that arrives (its name in .signal); restore after."""

    def __init__(self, signals: tuple[signal.Signals, ...] = ()):
        self.signals = signals
        self.signal: str | None = None
        self._previous: dict = {}

    @classmethod
    def from_env(cls) -> "StopRequest":
        return cls(parse_signals(os.environ.get(STOP_SIGNALS_ENV, "")))

    def _note(self, signum, frame) -> None:
        if self.signal is None:
            self.signal = signal.Signals(signum).name

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # handlers live in the main thread only
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def __enter__(self) -> "StopRequest":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()
