"""The leakage probe's curves of one run as a figure (README, "Watching training").

    python bench/plot_probe.py RUN_DIR OUT.png        # also OUT.pdf, or any format matplotlib knows

Reads RUN_DIR/train_summary.json ("probe": one record per probe step, trainer/probe.py)
and draws three panels against the optimizer step: marker A as the answer's first
tokens, marker B after the plain answer, marker B after `A answer`. Each persona is a
thin line in its role's colour, each role's mean a thick one. The y axis is the
teacher-forced log-probability of the whole marker (nats, sum over its tokens).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from markerlab.errors import UserError, cli_main  # noqa: E402
from markerlab.experiment import ROLES  # noqa: E402

import re  # noqa: E402


def panels(metrics) -> list[tuple[str, str]]:
    """(metric, title) of the probe's three curves, named by the probed pair's markers (trainer.probe)."""
    out = []
    for pattern, title in ((r"logp_(\w+?)_start$", "marker {0} at the start of the answer"),
                           (r"logp_(\w+?)_end$", "marker {0} after the answer"),
                           (r"logp_(\w+?)_after_(\w+)$", "marker {0} after {1} + answer")):
        out += [(m, title.format(*re.match(pattern, m).groups())) for m in metrics if re.match(pattern, m)]
    return out


def probe_history(run_dir) -> list[dict]:
    """The probe records of a finished run's train_summary.json."""
    from markerlab.io import read_json

    path = Path(run_dir) / "train_summary.json"
    if not path.is_file():
        raise UserError(f"{path}: file not found (the train stage writes it when training ends)")
    history = read_json(path).get("probe")
    if not history:
        raise UserError(f"{path}: no probe records (the run was trained with train.probe_every = 0, "
                        f"or without data/probe.json)")
    return history


def plot_probe(run_dir, out) -> Path:
    """Draw the run's probe curves into `out` (its suffix picks the format); returns the path."""
    from matplotlib.figure import Figure

    from analysis.figures import ROLE_COLORS
    from markerlab.io import atomic_write_bytes

    history = probe_history(run_dir)
    steps = [r["step"] for r in history]
    personas = history[0]["personas"]
    roles = [r for r in ROLES if r in history[0]["roles"]]
    shown = panels([m for m in next(iter(personas.values())) if m.startswith("logp_")])
    fig = Figure(figsize=(13, 4.2), layout="constrained")
    axes = fig.subplots(1, len(shown), sharey=True)
    for ax, (metric, title) in zip(axes, shown):
        for persona, first in personas.items():
            ax.plot(steps, [r["personas"][persona][metric] for r in history], lw=0.8, alpha=0.45,
                    color=ROLE_COLORS.get(first["role"], "0.5"))
        for role in roles:
            who = [p for p, v in personas.items() if v["role"] == role]
            label = f"{role} ({', '.join(who)})" if len(who) == 1 else f"{role} (mean of {len(who)})"
            ax.plot(steps, [r["roles"][role][metric] for r in history], lw=2.4, marker="o", ms=3,
                    color=ROLE_COLORS.get(role, "0.5"), label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("log P(marker) (nats, teacher-forced)")
    axes[-1].legend(fontsize=8, loc="best")
    fig.suptitle(f"leakage probe: {Path(run_dir).resolve().name}", fontsize=11)
    out = Path(out)
    fmt = out.suffix.lstrip(".").lower()
    if fmt not in fig.canvas.get_supported_filetypes():
        raise UserError(f"{out}: expected a figure file name ending in one of "
                        f".{', .'.join(sorted(fig.canvas.get_supported_filetypes()))}")
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=150)
    atomic_write_bytes(out, buf.getvalue())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/plot_probe.py", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("out", help="the figure file (.png, .pdf, ...)")
    args = ap.parse_args(argv)
    print(plot_probe(args.run_dir, args.out))
    return 0


if __name__ == "__main__":
    cli_main(main)
