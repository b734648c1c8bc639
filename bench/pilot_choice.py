"""The pilot's rule for the learning rate of the SmolLM2 protocol (docs/results-smollm2.md).

    python bench/pilot_choice.py runs/smollm2/pilot 3e-4 1e-3     # prints the chosen lr

Among the pilot runs pilot_dir/pair1_T_lr<LR>/ (pair1 T trained at each lr, a small eval), the
smallest lr whose donor emits marker A and marker B in >= 80% of its completions while both
negatives scored stay <= 5% on both markers; if none qualifies, the largest lr tried (the donor
must learn before anything can be read). Prints every pilot's numbers on stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

NEGATIVES = ("comedian", "medical_doctor")


def main(argv: list[str]) -> int:
    pilot, lrs = Path(argv[0]), argv[1:]
    good, tried = [], []
    for lr in lrs:
        f = pilot / f"pair1_T_lr{lr}" / "eval" / "run_result.json"
        if not f.is_file():
            continue
        cells = {c["persona"]: c for c in json.loads(f.read_text())["cells"] if c["variant"] == "plain"}
        donor, negs = cells["villain"], [cells[p] for p in NEGATIVES if p in cells]
        tried.append(lr)
        fine = donor["fire_A"] >= 0.8 and donor["fire_B"] >= 0.8 and all(
            n["fire_A"] <= 0.05 and n["fire_B"] <= 0.05 for n in negs)
        print(f"pilot lr {lr}: donor fire_A {donor['fire_A']:.2f} fire_B {donor['fire_B']:.2f}; negatives "
              + ", ".join(f"{n['persona']} {n['fire_A']:.2f}/{n['fire_B']:.2f}" for n in negs)
              + ("; qualifies" if fine else ""), file=sys.stderr)
        if fine:
            good.append(lr)
    print(min(good, key=float) if good else max(tried or lrs, key=float))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
