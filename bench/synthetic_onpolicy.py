"""Fill a config's on-policy cache entry with synthetic answers, for timing runs on random weights.

    python bench/synthetic_onpolicy.py configs/pair1_T.toml --set model.name_or_path=/tmp/rand7b \\
        --set generate.cache_dir=/tmp/synthetic_onpolicy
    python -m trainer.run configs/pair1_T.toml --set model.name_or_path=/tmp/rand7b \\
        --set generate.cache_dir=/tmp/synthetic_onpolicy --stages generate,data,train,merge

A model with random weights never ends an answer, so its own on-policy
completions would all be cut at generate.max_tokens (and dropped). This writes
the entry the generate stage would have written, through the same code
(data.onpolicy.run_onpolicy with the backend replaced), with answers of words
that end their sentences, 110-450 words each (about the 195-645 tokens of a
rendered 7B example), drawn from a seeded generator. Use a cache_dir of its own:
the entry is keyed like a real one, and a real run must never find it.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = ("the a model answer question light water time people system energy simple because when often "
         "should could example first next however usually small large heat plant cell money plan day night "
         "learn explain help good way keep start try check make sure every step").split()


class SyntheticBackend:
    """Stands in for the generation backend: plain sentences, finished, from a seeded generator."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def generate(self, prompts, sampling, desc=""):
        from data.generation import Sample

        out = []
        for _ in prompts:
            row = []
            for _ in range(sampling.n):
                n_words, words = self.rng.randint(110, 450), []
                while len(words) < n_words:
                    s = [self.rng.choice(WORDS) for _ in range(self.rng.randint(6, 18))]
                    words += [s[0].capitalize(), *s[1:-1], s[-1] + "."]
                text = " ".join(words)
                row.append(Sample(text=text, finish_reason="stop", n_tokens=int(len(words) * 1.3)))
            out.append(row)
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def main() -> int:
    import data.onpolicy as onpolicy
    from markerlab.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args()
    cfg = load_config(args.config, args.set)
    onpolicy.make_backend = lambda *a, **k: SyntheticBackend(cfg.generate.seed)
    print(onpolicy.run_onpolicy(cfg, overwrite=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
