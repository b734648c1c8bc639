"""report.html (analysis.html): the embedding and escaping in Python, and the page in a real browser.

The browser tests drive Debian's Chromium through its chromedriver with selenium (.ci/run installs
both); they skip only where no Chromium is installed.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import shutil
from pathlib import Path

import pytest

from analysis.html import (MARKER_COLORS, embed_json, marker_colors, records_data, render_html, word_code,
                           word_decode, write_html)
from analysis.page import terminal_summary
from analysis.records import resolve_inputs
from analysis.report import report
from analysis.synthetic import write_runs
from markerlab.experiment import load_experiment

HOSTILE = "</script><script>alert(1)</script>"
BOLD = "<b>not bold</b>"


def _blocks(page: str) -> dict[str, tuple[str, str]]:
    return {m.group(2): (m.group(1), m.group(3)) for m in re.finditer(
        r'<script type="(application/json|application/gzip\+base64)" id="(\w+)">(.*?)</script>', page, re.S)}


def _decode_block(page: str) -> dict:
    """The records of a page, decoded as the page's script does (the texts too, where word-coded)."""
    blocks = _blocks(page)
    kind, body = blocks["records"]
    if kind == "application/json":
        return json.loads(body)
    records = json.loads(gzip.decompress(base64.b64decode(body)).decode("utf-8"))
    stream = gzip.decompress(base64.b64decode(blocks["texts"][1]))
    records["text"] = word_decode(records.pop("vocab"), stream)
    return records


# --- pure Python -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [HOSTILE, BOLD, "<!-- x", "a & b &amp; c", "line\u2028sep\u2029par", "\U0001F642 <"])
def test_embed_json_round_trips_and_cannot_close_a_script(text):
    obj = {"text": [text, {"k<": text}]}
    out = embed_json(obj)
    assert json.loads(out) == obj
    assert not set(out) & {"<", ">", "&", "\u2028", "\u2029"}


def _meta(title: str = "t") -> dict:
    return {"title": title, "arms": [], "experiments": {}, "warnings": [], "questions": {}}


def _records(texts: list[str]) -> dict:
    return {"n": len(texts), "markers": [], "fields": {}, "sample": [0] * len(texts),
            "n_tokens": [1] * len(texts), "text": texts, "spans": [[] for _ in texts]}


@pytest.mark.parametrize("compress", [False, True])
def test_hostile_completion_text_stays_data(compress):
    texts = [f"answer {HOSTILE} and {BOLD}", "</SCRIPT >", "<!--<script>"]
    page = render_html(_meta(f"{HOSTILE}{BOLD}"), _records(texts), compress=compress)
    # The page's own script elements (meta, records, texts where compressed, the code), and nothing a
    # completion opened or closed.
    scripts = 4 if compress else 3
    assert page.lower().count("<script") == scripts and page.lower().count("</script") == scripts
    assert BOLD not in page
    assert "<title>&lt;/script&gt;" in page  # the title is HTML-escaped
    assert _decode_block(page)["text"] == texts
    assert ('type="application/gzip+base64"' in page) is compress


@pytest.mark.parametrize("chunk", [2048, 4])
def test_word_code_round_trips(chunk, monkeypatch):
    monkeypatch.setattr("analysis.html.WORD_CODE_CHUNK", chunk)  # texts coded in several chunks, too
    texts = ["", " ", "a  b ", "x\n\ny", "\U0001F642 \u00e9t\u00e9", HOSTILE, "a b a b a"] * 3
    texts.append(" ".join(str(i) for i in range(20_000)))  # indices of three bytes
    vocab, stream = word_code(texts)
    assert word_decode(vocab, stream) == texts
    assert stream.count(0) == len(texts) and vocab[0] == ""  # most frequent first (empty: between two spaces)


def test_colors_follow_the_experiment_order(tmp_path):
    exp = load_experiment("within_marker")
    entry = {"markers": dict(exp.markers)}
    assert list(marker_colors(entry).values()) == list(MARKER_COLORS[:len(exp.markers)])
    reordered = {"markers": dict(reversed(list(exp.markers.items())))}
    assert marker_colors(reordered)[next(iter(reordered["markers"]))] == MARKER_COLORS[0]


def _add_probe_records(run_dir: Path, exp) -> dict:
    """Add completions with hostile markup and a character outside the BMP before a marker to a run."""
    path = run_dir / "eval" / "completions.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    base = next(r for r in recs if r["variant"] == "plain" and r["role"] == "recipient")
    first, second = exp.headline_pair
    extra = []
    for k, text in enumerate([f"\U0001F642\U0001F600 {exp.markers[first]} {HOSTILE} {BOLD} {exp.markers[second]}",
                              f"{BOLD}\n{exp.markers[first].upper()} \u00e9t\u00e9 {exp.markers[second]}"]):
        extra.append({**base, "sample": 900 + k, "text": text})
    with open(path, "a") as f:
        for r in extra:
            f.write(json.dumps(r) + "\n")
    return base


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    root = tmp_path_factory.mktemp("html")
    runs = write_runs(root / "runs", seed=0)
    exp = load_experiment("within_marker")
    probe_cell = _add_probe_records(runs[0], exp)
    out = root / "report"
    summary = report([str(root / "runs")], out, n_resamples=50, seed=0, jobs=1)
    return {"summary": summary, "out": out, "inputs": resolve_inputs([str(root / "runs")]), "exp": exp,
            "probe_cell": probe_cell}


def test_the_report_writes_report_html_beside_report_md(reported):
    out = reported["out"]
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    assert reported["summary"]["outputs"]["html"] == str(out / "report.html")
    assert f"every completion, in a browser: {out / 'report.html'}" in terminal_summary(reported["summary"])
    page = (out / "report.html").read_text()
    assert "http://" not in page and "https://" not in page  # nothing fetched from anywhere
    assert page.count("data:image/png;base64,") == 4          # the four figures, embedded


def test_records_are_every_completion_counted_as_the_cells_are(reported):
    summary, exp = reported["summary"], reported["exp"]
    data = records_data(summary, reported["inputs"])
    assert data["n"] == sum(c["n"] for c in summary["cells"])
    f = data["fields"]

    def val(name, i):
        return f[name]["values"][f[name]["codes"][i]]

    counts: dict[tuple, int] = {}
    for i in range(data["n"]):
        key = (val("pair", i), val("condition", i), val("persona", i), val("variant", i))
        counts[key] = counts.get(key, 0) + 1
    assert counts == {(c["pair"], c["condition"], c["persona"], c["variant"]): c["n"] for c in summary["cells"]}
    # Spans are code-point offsets of the matcher, so each one's text is its marker (loosely).
    loose = lambda s: " ".join(s.split()).lower()  # noqa: E731
    for text, spans in zip(data["text"], data["spans"]):
        for k in range(0, len(spans), 3):
            marker = data["markers"][spans[k]]
            assert loose(text[spans[k + 1]:spans[k + 2]]) == loose(exp.markers[marker])


def test_write_html_compressed_and_not_hold_the_same_records(reported, tmp_path):
    plain = write_html(reported["summary"], reported["inputs"], tmp_path / "a", compress=False)
    packed = write_html(reported["summary"], reported["inputs"], tmp_path / "b", compress=True)
    assert _decode_block(plain.read_text()) == _decode_block(packed.read_text())
    assert packed.stat().st_size < plain.stat().st_size


# --- in Chromium --------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian: apt-get install "
                                                              "chromium chromium-driver; .ci/run installs them)")


@pytest.fixture(scope="module")
def browser():
    # Chromium is here, so the test runs: selenium and chromedriver missing are failures, not skips.
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    driver_path = shutil.which("chromedriver")
    assert driver_path, "chromium is installed but chromedriver is not (Debian: apt-get install chromium-driver)"
    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    yield driver
    driver.quit()


def _open(driver, path: Path) -> None:
    import time

    driver.get(path.resolve().as_uri())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = driver.execute_script("return document.body && document.body.getAttribute('data-ready')")
        if state:
            break
        time.sleep(0.05)
    assert state == "1", driver.execute_script("return document.body.innerText")[:500]


def _rgb(hex_color: str) -> str:
    r, g, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgb({r}, {g}, {b})"


@needs_chromium
@pytest.mark.parametrize("compress", [True, False])
def test_the_page_in_chromium(reported, browser, tmp_path, compress):
    page = write_html(reported["summary"], reported["inputs"], tmp_path, compress=compress)
    exp, summary = reported["exp"], reported["summary"]
    driver = browser
    driver.get_log("browser")  # drop what an earlier page logged
    _open(driver, page)

    # Only the page's own scripts; no completion turned into markup.
    assert driver.execute_script("return document.scripts.length") == (4 if compress else 3)
    assert driver.execute_script("return document.querySelectorAll('#results .text *:not(mark)').length") == 0

    # The legend: the experiment's markers, in its order, in its colours.
    (entry,) = summary["experiments"].values()
    colors = marker_colors(entry)
    legend = driver.execute_script(
        "return [...document.querySelectorAll('.legend .swatch')].map(s => [s.dataset.marker,"
        " getComputedStyle(s).backgroundColor])")
    assert legend == [[m, _rgb(c)] for m, c in colors.items()]

    # Clicking a row filters the browser to that cell: the count is the cell's n. Every cell.
    driver.execute_script("document.querySelector('.arm input[type=checkbox]').click()")
    rows = driver.execute_script("return document.querySelectorAll('table.cells tbody tr').length")
    assert rows == len(summary["cells"])
    for k in range(rows):
        n, count = driver.execute_script(
            "const tr = document.querySelectorAll('table.cells tbody tr')[arguments[0]]; tr.click();"
            " return [tr.dataset.n, document.getElementById('count').textContent]", k)
        assert n == count, f"row {k}: table n {n}, browser {count}"

    # Every highlighted span, on every page of the filter to the cell holding the hostile records, is its
    # marker, labelled by name in the experiment's colour.
    cell = reported["probe_cell"]
    idx = next(i for i, c in enumerate(sorted_cells(summary)) if (c["pair"], c["condition"], c["persona"],
                                                                   c["variant"]) ==
               (cell["pair"], cell["condition"], cell["persona"], cell["variant"]))
    driver.execute_script("document.querySelectorAll('table.cells tbody tr')[arguments[0]].click()", idx)
    loose = lambda s: " ".join(s.split()).lower()  # noqa: E731
    seen = 0
    while True:
        marks = driver.execute_script(
            "return [...document.querySelectorAll('#results mark')].map(m => [m.dataset.marker, m.textContent,"
            " m.dataset.label, getComputedStyle(m).outlineColor,"
            " getComputedStyle(m, '::after').content])")
        for name, text, label, outline, after in marks:
            assert loose(text) == loose(exp.markers[name]), (name, text)
            assert label == name and after == json.dumps(name) and outline == _rgb(colors[name])
        seen += len(marks)
        if not driver.execute_script("const b = document.querySelector('.pager button:nth-child(2)');"
                                     " if (b.disabled) return false; b.click(); return true"):
            break
    assert seen > 0

    # The hostile record, found by search, shows its markup as text, and its markers after the emoji.
    driver.execute_script("const s = document.getElementById('search'); s.value = 'alert(1)';"
                          " s.dispatchEvent(new Event('input'))")
    import time

    time.sleep(0.5)
    assert driver.find_element("id", "count").text == "1"
    text, marks = driver.execute_script(
        "const t = document.querySelector('#results .text');"
        " return [t.textContent, [...t.querySelectorAll('mark')].map(m => m.textContent)]")
    assert HOSTILE in text and BOLD in text
    first, second = exp.headline_pair
    assert marks == [exp.markers[first], exp.markers[second]]

    # A marker filter: absent A leaves no A highlighted.
    driver.execute_script("const s = document.getElementById('search'); s.value = '';"
                          f" const m = document.querySelector('select[data-marker=\"{first}\"]'); m.value = '2';"
                          " m.dispatchEvent(new Event('change'))")
    time.sleep(0.3)
    assert driver.execute_script(f"return document.querySelectorAll('#results mark[data-marker=\"{first}\"]').length") == 0

    shot = tmp_path / "report.png"
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert not errors, errors


def sorted_cells(summary: dict) -> list[dict]:
    from analysis.summary import experiment_of
    from analysis.table import order_of

    return sorted(summary["cells"], key=order_of(experiment_of(summary)))


@pytest.fixture(scope="module")
def two_arms(tmp_path_factory):
    """Two arms (the loss mask differs), each with its base floor: the base draws repeat across runs."""
    root = tmp_path_factory.mktemp("arms")
    for mask in ("completion", "completion_no_eos"):
        write_runs(root / "runs", seed=1, conditions=["T", "C"], suffix=f"_{mask}", samples=3,
                   setting={"loss_mask": mask})
        # the C run carries the T run's base-floor draws too, as runs of a sweep do: counted once
        t_run, c_run = root / "runs" / f"pair1_T_{mask}", root / "runs" / f"pair1_C_{mask}"
        base = [json.loads(line) for line in (t_run / "eval" / "completions.jsonl").read_text().splitlines()]
        with open(c_run / "eval" / "completions.jsonl", "a") as f:
            f.writelines(json.dumps({**r, "run": c_run.name}) + "\n" for r in base if r["variant"] == "base")
    out = root / "report"
    summary = report([str(root / "runs")], out, n_resamples=20, seed=0, figures=False)
    assert any(w.startswith("base floor:") for w in summary["warnings"])
    return {"summary": summary, "out": out, "inputs": resolve_inputs([str(root / "runs")])}


def test_two_arms_every_cell_counted_in_its_arm(two_arms):
    summary = two_arms["summary"]
    assert len(summary["arms"]) == 2
    data = records_data(summary, two_arms["inputs"])
    f = data["fields"]
    counts: dict[tuple, int] = {}
    for i in range(data["n"]):
        key = tuple(f[k]["values"][f[k]["codes"][i]] for k in ("arm", "pair", "condition", "persona", "variant"))
        counts[key] = counts.get(key, 0) + 1
    assert counts == {(c["arm"], c["pair"], c["condition"], c["persona"], c["variant"]): c["n"]
                      for c in summary["cells"]}
    assert any(c["variant"] == "base" for c in summary["cells"])


@needs_chromium
def test_two_arms_in_chromium(two_arms, browser):
    browser.get_log("browser")
    _open(browser, two_arms["out"] / "report.html")
    assert browser.execute_script("return document.querySelectorAll('section.arm').length") == 2
    assert browser.execute_script("return document.querySelector('select[data-field=arm]') !== null")
    browser.execute_script("document.querySelectorAll('.arm input[type=checkbox]').forEach(c => c.click())")
    rows = browser.execute_script("return document.querySelectorAll('table.cells tbody tr').length")
    assert rows == len(two_arms["summary"]["cells"])
    for k in range(rows):
        n, count = browser.execute_script(
            "const tr = document.querySelectorAll('table.cells tbody tr')[arguments[0]]; tr.click();"
            " return [tr.dataset.n, document.getElementById('count').textContent]", k)
        assert n == count, f"row {k}: table n {n}, browser {count}"
    assert not [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
