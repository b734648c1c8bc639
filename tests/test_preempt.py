"""A scheduler's stop signal (trainer/preempt.py): training saves at the step boundary, exits 75, and the
resumed run ends with the uninterrupted run's adapter. Without SLURM; tests/test_slurm.py does it under
a real one (scontrol requeue)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from markerlab.io import read_json
from test_trainer import make_cfg, mixed_dataset, write_data
from trainer.preempt import STOP_SIGNALS_ENV, StopRequest, parse_signals

REPO = Path(__file__).resolve().parents[1]

# Trains the run directory in argv[1]. With argv[2] = N, pauses inside optimizer step N (after its
# forward and backward) until a line arrives on stdin, so the parent's signal lands mid-step.
CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from markerlab.config import load_config
    from markerlab.errors import UserError
    import trainer.train as T

    run_dir, pause_in_step = Path(sys.argv[1]), int(sys.argv[2])
    if pause_in_step:
        calls, orig = [0], T.forward_backward
        def hooked(*a, **k):
            out = orig(*a, **k)
            calls[0] += 1
            if calls[0] == pause_in_step:
                print("PAUSED", flush=True)
                sys.stdin.readline()
            return out
        T.forward_backward = hooked
    try:
        T.train(load_config(run_dir / "config.toml"), run_dir)
    except UserError as e:
        print(f"STOPPED {e}", flush=True)
        sys.exit(e.exit_code)
    print("DONE", flush=True)
""")


def child(run_dir: Path, pause_in_step: int = 0, stop_signals: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop(STOP_SIGNALS_ENV, None)
    if stop_signals:
        env[STOP_SIGNALS_ENV] = stop_signals
    return subprocess.Popen([sys.executable, "-c", CHILD, str(run_dir), str(pause_in_step)], cwd=REPO, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def test_a_stop_signal_saves_at_the_step_boundary_and_the_resumed_adapter_is_identical(tmp_path, tiny_model_dir):
    """SIGTERM (a requeue, a preemption, a cancel); SLURM's USR2 warning takes the same path."""
    sig = "TERM"
    runs = {}
    for name in ("straight", "stopped"):
        run_dir = tmp_path / name
        write_data(run_dir, mixed_dataset(10))  # 3 steps per epoch, 9 steps
        cfg = make_cfg(run_dir, epochs=3, checkpoint_every=4, dropout=0.1)
        (run_dir / "config.toml").write_text(cfg.to_toml())
        runs[name] = run_dir
    straight = child(runs["straight"])
    stopped = child(runs["stopped"], pause_in_step=5, stop_signals="USR2,TERM")
    assert stopped.stdout.readline().strip() == "PAUSED"
    stopped.send_signal(getattr(signal, "SIG" + sig))  # noted by the handler; step 5 goes on
    stopped.stdin.write("go\n")
    stopped.stdin.flush()
    out = stopped.stdout.read()
    assert stopped.wait(timeout=300) == 75, out
    assert f"STOPPED training stopped by SIG{sig} after step 5 of 9" in out
    ckpts = sorted(p.name for p in (runs["stopped"] / "checkpoints").iterdir())
    assert ckpts == ["step_000004", "step_000005"]  # the periodic one, and the one the signal asked for
    assert not (runs["stopped"] / "adapter").exists()

    resumed = child(runs["stopped"], stop_signals="USR2,TERM")  # no signal this time: runs to the end
    assert resumed.wait(timeout=300) == 0 and resumed.stdout.read().strip() == "DONE"
    assert straight.wait(timeout=300) == 0
    a, b = (read_json(runs[n] / "train_summary.json") for n in ("straight", "stopped"))
    assert b["resumed_from_step"] == 5
    keys = ["step", "loss", "lr", "grad_norm"]
    assert [[h[k] for k in keys] for h in a["history"]] == [[h[k] for k in keys] for h in b["history"]]
    w = "adapter/adapter_model.safetensors"
    assert (runs["straight"] / w).read_bytes() == (runs["stopped"] / w).read_bytes()


def test_without_the_variable_nothing_is_installed(monkeypatch):
    monkeypatch.delenv(STOP_SIGNALS_ENV, raising=False)
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest.from_env() as stop:
        assert signal.getsignal(signal.SIGTERM) is before and stop.signal is None
    assert parse_signals("USR2, term") == (signal.SIGUSR2, signal.SIGTERM)


def test_the_handler_notes_the_first_signal_and_is_removed_after(monkeypatch):
    before = signal.getsignal(signal.SIGUSR2)
    monkeypatch.setenv(STOP_SIGNALS_ENV, "USR2")
    with StopRequest.from_env() as stop:
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.signal == "SIGUSR2"
    assert signal.getsignal(signal.SIGUSR2) is before


def test_an_unknown_signal_name_is_one_line(monkeypatch):
    from markerlab.errors import UserError

    monkeypatch.setenv(STOP_SIGNALS_ENV, "USR2,BOGUS")
    with pytest.raises(UserError, match=f"{STOP_SIGNALS_ENV}: unknown signal 'BOGUS'"):
        StopRequest.from_env()
