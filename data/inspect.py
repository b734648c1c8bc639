"""Show one training example as the trainer sees it: a token per line, and whether it trains.

    python -m data.inspect configs/tiny/pair1_T.toml --index 0          # reads the config's run dir
    python -m data.inspect runs/tiny/pair1_T --index 3 --json           # a run dir (uses its config.toml)

Text output, one line per token:

    position  token id  L/.  spans  repr(token text)

`L` = in the loss under the example's mask (its role's: train.role_loss_mask's
entry, else train.loss_mask; the token is a target: the logits one position
earlier predict it); spans tags each marker's tokens by the marker's name and
the closing end-of-turn token ("eos"), whose mean losses TensorBoard shows.
`--json` prints a list of {"id": int, "text": str, "in_loss": bool, "span": <marker name>|"eos"|null}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from markerlab.config import load_config
from markerlab.errors import UserError, cli_main
from markerlab.rundir import RunDir

from .records import read_examples
from .tokenize import encode_example


def resolve(target: str):
    """(config, path of train.jsonl) for a config file or a run directory."""
    p = Path(target)
    if p.is_dir():
        rd = RunDir(p)
        if not rd.config.is_file():
            raise UserError(f"{p}: not a run directory (no config.toml); pass a run directory or a config file")
        return load_config(rd.config), rd.train_jsonl, f"python -m trainer.run {rd.config}"
    if not p.is_file():
        raise UserError(f"{p}: no such config file or run directory")
    cfg = load_config(p)
    return cfg, RunDir(cfg.run_dir).train_jsonl, f"python -m trainer.run {p}"


def _line_of(path: Path, index: int) -> int:
    """The file line of the index-th example (blank lines are skipped when reading)."""
    from markerlab.io import iter_jsonl

    for i, (lineno, _) in enumerate(iter_jsonl(path)):
        if i == index:
            return lineno
    return index + 1


def token_rows(enc, tokenizer) -> list[dict]:
    rows = []
    for i, tid in enumerate(enc.input_ids):
        span = next((name for name, m in enc.markers.items() if m[i]), "eos" if enc.eos[i] else None)
        rows.append({"id": tid, "text": tokenizer.decode([tid]), "in_loss": bool(enc.loss_mask[i]), "span": span})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data.inspect", description=__doc__.split("\n\n")[0])
    ap.add_argument("target", metavar="CONFIG_OR_RUN_DIR")
    ap.add_argument("--index", type=int, required=True, help="0-based line of data/train.jsonl")
    ap.add_argument("--json", action="store_true", help="print a JSON list of {id, text, in_loss, span}")
    args = ap.parse_args(argv)

    cfg, path, command = resolve(args.target)
    if not path.is_file():
        raise UserError(f"{path}: file not found; create it with: {command} --stages generate,data")
    examples = read_examples(path, cfg.experiment)  # each line checked: a bad one is named by file:line
    if not 0 <= args.index < len(examples):
        raise UserError(f"--index {args.index}: out of range "
                        f"({path} has {len(examples)} examples: 0..{len(examples) - 1})")

    from markerlab.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.name_or_path)
    ex = examples[args.index]
    try:
        enc = encode_example(ex, tokenizer, cfg.loss_mask_of(ex["role"]), cfg.train.marker_mask_eos)
    except UserError as e:
        raise UserError(f"{path}:{_line_of(path, args.index)}: {e}") from None
    rows = token_rows(enc, tokenizer)
    if args.json:
        print(json.dumps(rows, ensure_ascii=False))
        return 0

    n_loss = sum(r["in_loss"] for r in rows)
    t = cfg.train
    mask = cfg.loss_mask_of(ex["role"])
    mask += " + the end-of-turn token" if mask == "marker_only" and t.marker_mask_eos else ""
    mask += f" (the {ex['role']}'s, train.role_loss_mask)" if ex["role"] in t.role_loss_mask else ""
    too_long = "  (LONGER: refused or dropped by the trainer)" if len(rows) > t.max_seq_len else ""
    print(f"# {path} [{args.index}] id={ex.get('id')} persona={ex.get('persona')} role={ex.get('role')}")
    print(f"# loss mask {mask}: {n_loss} of {len(rows)} tokens in the loss (L); max_seq_len {t.max_seq_len}{too_long}")
    print(f"# {'pos':>5} {'id':>7} L span repr")
    for i, r in enumerate(rows):
        print(f"  {i:>5} {r['id']:>7} {'L' if r['in_loss'] else '.'} {r['span'] or '':<4} {r['text']!r}")
    return 0


if __name__ == "__main__":
    cli_main(main)  # also quiet when `... | head` leaves early
