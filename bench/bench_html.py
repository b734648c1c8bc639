"""Benchmark report.html at the write-up's protocol scale: file size and time-to-usable in headless Chromium.

    PYTHONPATH=. python bench/bench_html.py [--tokens 600] [--loads 3] [--keep DIR]

The sweep: within_marker's six adapters with the write-up's counts
(analysis.synthetic.write_up_records: 17,160 plain completions, 11 personas x 26
questions x 10 samples per run), written as six run directories, each answer
replaced by about ``--tokens`` tokens (Qwen2.5's tokenizer, measured) of
English-like text: a word-bigram chain over the prose of CPython's own
documentation (``pydoc_data.topics``), drawn per completion from a seeded
generator, so completions share words and phrases but never whole passages.
The chain's text gzips like its source prose (ratio ~3.4); real answers to the
same question are likely more alike than this, so the size is meant as a
conservative figure. Markers stay where the write-up's templates put them.

Then ``analysis.report`` runs on the six run directories (in process, B=200,
figures drawn: the bootstrap is not what is measured here) and ``write_html``
is timed apart (writing the same report.html again); report.html is opened from ``file://`` in headless Chromium
(Debian's, through its chromedriver and selenium) ``--loads`` times, each in a
fresh browser. Time-to-usable is the page's own ``performance.now()`` when it
is ready (records inflated, cells table, filters and the first page of
completions drawn), measured from navigation start; then the wall time of
clicking a cell row (filter + draw) and of the first free-text search (which
decodes every text) in the last browser.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from analysis.html import write_html  # noqa: E402
from analysis.records import resolve_inputs  # noqa: E402
from analysis.report import report  # noqa: E402
from analysis.synthetic import write_records, write_up_records  # noqa: E402
from markerlab.rundir import RunDir  # noqa: E402


def bigram_chain() -> tuple[dict, list]:
    import pydoc_data.topics as topics

    prose = [line for text in topics.topics.values() for line in text.splitlines()
             if line.strip() and not line.startswith("   ") and not re.search(r">>>|::|\*\*\*|===|---|\|", line)]
    words = " ".join(prose).split()
    chain = collections.defaultdict(list)
    for a, b in zip(words, words[1:]):
        chain[a].append(b)
    return chain, list(chain)


def make_text(rng: random.Random, chain: dict, keys: list, n_chars: int) -> str:
    w = rng.choice(keys)
    out, n = [w], len(w)
    while n < n_chars:
        nxt = chain.get(w)
        w = rng.choice(nxt) if nxt else rng.choice(keys)
        out.append(w)
        n += len(w) + 1
    # paragraphs, as chat answers have them
    for k in range(80, len(out), 80):
        out[k] = "\n\n" + out[k]
    return " ".join(out)


def build_sweep(root: Path, tokens: int, seed: int = 0) -> tuple[list[Path], dict]:
    from markerlab.models import build_qwen_tokenizer

    tok = build_qwen_tokenizer()
    chain, keys = bigram_chain()
    rng = random.Random(seed)
    sample = [make_text(rng, chain, keys, 3000) for _ in range(200)]
    chars_per_token = sum(map(len, sample)) / sum(len(tok(t)["input_ids"]) for t in sample)
    n_chars = int(tokens * chars_per_token)
    records = write_up_records(seed=seed)
    answer = "The answer explains the idea step by step with an example."
    by_run: dict[str, list[dict]] = {}
    for rec in records:
        body = make_text(rng, chain, keys, n_chars)
        rec["text"] = rec["text"].replace(" ".join([answer] * 4), body)
        rec["n_tokens"] = tokens
        by_run.setdefault(rec["run"], []).append(rec)
    dirs = []
    for run, recs in by_run.items():
        write_records(RunDir(root / run).completions, recs)
        dirs.append(root / run)
    check = [r["text"] for r in records[:: max(1, len(records) // 200)]]
    measured = sum(len(tok(t)["input_ids"]) for t in check) / len(check)
    return dirs, {"records": len(records), "chars_per_token": round(chars_per_token, 2),
                  "mean_chars": round(sum(len(r["text"]) for r in records) / len(records)),
                  "mean_tokens_sampled": round(measured), "text_mb": round(sum(len(r["text"].encode()) for r in records) / 1e6, 1)}


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


def wait_ready(driver, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = driver.execute_script("return document.body && document.body.getAttribute('data-ready')")
        if state == "1":
            return
        if state == "error":
            raise SystemExit("the page failed: " + driver.execute_script("return document.body.innerText")[:500])
        time.sleep(0.02)
    raise SystemExit("the page was not ready in time")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=600, help="tokens per completion (default 600, eval's max_tokens)")
    ap.add_argument("--loads", type=int, default=3, help="page loads, each in a fresh browser (default 3)")
    ap.add_argument("--keep", type=Path, default=None, help="keep the sweep and the report here")
    args = ap.parse_args()

    tmp = Path(args.keep or tempfile.mkdtemp(prefix="bench_html_"))
    t0 = time.perf_counter()
    dirs, info = build_sweep(tmp / "runs", args.tokens)
    print(f"sweep: {json.dumps(info)} ({time.perf_counter() - t0:.1f} s to build)")

    out = tmp / "report"
    t0 = time.perf_counter()
    summary = report([str(d) for d in dirs], out, n_resamples=200, seed=0)
    t_report = time.perf_counter() - t0
    inputs = resolve_inputs([str(d) for d in dirs])
    t0 = time.perf_counter()
    page = write_html(summary, inputs, out)  # the report's own page again (its figures embedded), timed alone
    t_html = time.perf_counter() - t0
    size = page.stat().st_size
    print(f"report (B=200, figures, report.html included): {t_report:.1f} s; write_html alone: {t_html:.1f} s")
    print(f"report.html: {size / 1e6:.2f} MB ({size:,} bytes) for {info['records']:,} completions")

    loads = []
    for _ in range(args.loads):
        driver = browser()
        try:
            t0 = time.perf_counter()
            driver.get(page.resolve().as_uri())
            wait_ready(driver)
            wall = time.perf_counter() - t0
            ready = driver.execute_script("return window.markerlabReadyMs")
            errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            loads.append((ready / 1000, wall))
            print(f"load: usable at {ready / 1000:.2f} s after navigation start (wall {wall:.2f} s); console errors: {len(errors)}")
            if errors:
                print(errors)
        finally:
            if _ < args.loads - 1:
                driver.quit()
    def filtered(script: str) -> float:
        """Run ``script`` (which changes a filter) and return the page's own time for the update."""
        k = int(driver.execute_script("return document.body.getAttribute('data-updates')"))
        driver.execute_script(script)
        while int(driver.execute_script("return document.body.getAttribute('data-updates')")) == k:
            time.sleep(0.01)
        return float(driver.execute_script("return document.body.getAttribute('data-update-ms')")) / 1000

    t_click = filtered("document.querySelector('table.cells tbody tr').click()")
    n, count = driver.execute_script("return [document.querySelector('table.cells tbody tr').dataset.n,"
                                     " document.getElementById('count').textContent]")
    filtered("document.querySelector('.filters button').click()")
    t_search = filtered("const s = document.getElementById('search'); s.value = 'dictionary';"
                        " s.dispatchEvent(new Event('input'))")
    hits = driver.execute_script("return document.getElementById('count').textContent")
    t_search2 = filtered("const s = document.getElementById('search'); s.value = 'tuple';"
                         " s.dispatchEvent(new Event('input'))")
    driver.quit()
    print(f"cell click: {t_click * 1000:.0f} ms (cell n {n}, browser count {count}); first search: {t_search:.2f} s"
          f" ({hits} hits; decodes every text), next search: {t_search2 * 1000:.0f} ms")
    chromium = subprocess.run([shutil.which("chromium") or "chromium", "--version"], capture_output=True, text=True).stdout.strip()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; {chromium}; Python {platform.python_version()}")
    print(f"usable: min {min(x for x, _ in loads):.2f} s, median {sorted(x for x, _ in loads)[len(loads) // 2]:.2f} s")
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
