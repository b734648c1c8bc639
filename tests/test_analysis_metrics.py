"""Cell arithmetic on hand-built records, record checking, and the write-up's gates and verdict."""

from __future__ import annotations

import json

import pytest

from analysis.bootstrap import Bootstrap
from analysis.gates import Checker, k_and, k_not, k_or, verdict_entry
from analysis.records import ReportError, load
from analysis.report import report
from analysis.summary import summarize
from analysis.synthetic import default_setting
from markerlab.experiment import load_experiment

EXP = load_experiment("within_marker")
A, B = EXP.markers["A"], EXP.markers["B"]


def rec(text="plain answer", **kw):
    r = {"run": "r1", "pair": "pair1", "condition": "T", "persona": "villain", "role": "donor",
         "question_id": "q00", "split": "id", "sample": 0, "variant": "plain", "text": text,
         "finish_reason": "stop", "n_tokens": 12, "setting": default_setting()}
    r.update(kw)
    return r


def cell_records(n_ab, n_a_only, n_b_only, n_none, questions=26, **kw):
    """Records of one cell with the given marker counts, spread over questions.
    Answers are 300 characters long, so a B at the end is far (>150) from A."""
    answer = "word " * 60
    texts = ([f"{A} {answer}{B}"] * n_ab + [f"{A} {answer}"] * n_a_only
             + [f"{answer}{B}"] * n_b_only + [answer] * n_none)
    return [rec(t, question_id=f"q{i % questions:02d}", sample=i // questions, **kw)
            for i, t in enumerate(texts)]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_write_up_arithmetic(tmp_path):
    """n=260, 247 with A, 218 with B, 214 with both (the write-up's villain cell)."""
    records = cell_records(n_ab=214, n_a_only=33, n_b_only=4, n_none=9)
    records += cell_records(0, 0, 3, 257, persona="assistant", role="recipient")  # A never fires
    path = write_jsonl(tmp_path / "c.jsonl", records)
    summary = report([str(path)], tmp_path / "out", n_resamples=200, figures=False)

    donor = next(c for c in summary["cells"] if c["persona"] == "villain")
    assert (donor["n"], donor["n_A"], donor["n_B"], donor["n_AB"]) == (260, 247, 218, 214)
    assert round(donor["fire_A"], 4) == 0.95
    assert round(donor["fire_B"], 4) == 0.8385
    assert round(donor["cond_B_given_A"], 4) == 0.8664
    assert round(donor["joint"], 4) == round(214 / 260, 4)
    assert donor["strict"]["cond_B_given_A"] == donor["cond_B_given_A"]
    assert donor["suffix_frac"] == 1.0 and donor["chunk_frac"] == 0.0  # "A answer B": B at the end
    lo, hi = donor["cond_B_given_A_ci"]
    assert lo < donor["cond_B_given_A"] < hi

    recipient = next(c for c in summary["cells"] if c["persona"] == "assistant")
    assert recipient["n_A"] == 0 and recipient["fire_A"] == 0.0
    assert recipient["cond_B_given_A"] is None and recipient["cond_B_given_A_ci"] is None
    assert recipient["strict"]["cond_B_given_A"] is None
    raw = json.loads((tmp_path / "out" / "summary.json").read_text())
    cell = next(c for c in raw["cells"] if c["persona"] == "assistant")
    assert cell["cond_B_given_A"] is None  # JSON null, never 0
    assert '"cond_B_given_A": null' in (tmp_path / "out" / "summary.json").read_text()


def test_position_fractions_null_when_b_never_fires(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", cell_records(0, 100, 0, 30))
    (arm,) = load([path]).arms
    s = summarize(arm, Bootstrap(100, 0))["cells"][0]
    assert s["fire_B"] == 0.0 and s["suffix_frac"] is None and s["chunk_frac"] is None
    assert s["suffix_frac_ci"] is None


def test_cells_pool_seed_replicates_and_split_by_variant(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", cell_records(10, 0, 0, 0, run="seed1", setting=default_setting(seed=1))
                    + cell_records(1, 0, 0, 9, variant="probe", persona="assistant", role="recipient",
                                   run="seed1", setting=default_setting(seed=1)))
    b = write_jsonl(tmp_path / "b.jsonl", cell_records(5, 5, 0, 0, run="seed2", setting=default_setting(seed=2)))
    loaded = load([a, b])
    (arm,) = loaded.arms
    assert arm.seeds == [1, 2] and arm.runs == ["seed1", "seed2"]
    plain = next(c for c in arm.cells if c.variant == "plain")
    assert plain.count("n") == 20 and plain.count("A") == 20 and plain.count("AB") == 15
    assert plain.runs == ["seed1", "seed2"] and plain.replicates == [1, 2] and plain.groups == (10, 10)
    assert [c.variant for c in arm.cells] == ["plain", "probe"]
    s = summarize(arm, Bootstrap(200, 0))
    assert s["arms"][0]["replicates"] == {"key": "seed", "values": [1, 2]}
    assert "seed" in s["arms"][0]["pooled"] and s["bootstrap"]["unit"] == "seed, then question"


def test_same_setting_and_seed_twice_is_an_error(tmp_path):
    """Two runs that differ in nothing a record says are not replicates: never pooled."""
    a = write_jsonl(tmp_path / "a.jsonl", cell_records(10, 0, 0, 0, run="first"))
    b = write_jsonl(tmp_path / "b.jsonl", cell_records(5, 5, 0, 0, run="second"))
    with pytest.raises(ReportError, match=r"b.jsonl:1: field 'setting': runs first and second have the same"
                                          r" setting and seed \(42\) for pair1 T"):
        load([a, b])


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.pop("question_id"), "missing field 'question_id'"),
    (lambda r: r.update(condition="X"), "field 'condition' is 'X', which experiment 'within_marker' ("),
    (lambda r: r.update(persona="pirate"), "field 'persona' is 'pirate', which experiment 'within_marker' ("),
    (lambda r: r.update(pair="pair9"), "field 'pair' is 'pair9', which experiment 'within_marker' ("),
    (lambda r: r.update(role="teacher"), "field 'role'"),
    (lambda r: r.update(sample="3"), "field 'sample' is '3', expected an integer"),
    (lambda r: r.update(sample=True), "field 'sample' is True, expected an integer"),
    (lambda r: r.update(text=None), "field 'text' is None, expected a string"),
    (lambda r: r.update(finish_reason="eos"), "field 'finish_reason'"),
    (lambda r: r.update(split="test"), "field 'split'"),
    (lambda r: r.update(variant="x"), "field 'variant'"),
    # Records from before settings travelled in them: their arm cannot be known.
    (lambda r: r.pop("setting"), "missing field 'setting': written by an older markerlab; re-run eval"),
    (lambda r: r.update(setting="completion"), "field 'setting' is 'completion', expected an object"),
    (lambda r: r["setting"].pop("loss_mask"), "field 'setting' has no 'loss_mask'"),
    (lambda r: r["setting"].update(lr=[1e-5]), "field 'setting.lr' is [1e-05], expected a string, number"),
])
def test_bad_record_names_file_line_and_field(tmp_path, mutate, message):
    records = [rec(sample=i) for i in range(3)]
    mutate(records[1])
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(ReportError) as e:
        load([path])
    assert str(e.value).startswith(f"{path}:2: ")
    assert message in str(e.value)


def test_bad_json_and_non_object(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(rec()) + "\n\n{not json\n")
    with pytest.raises(ReportError, match=r"bad.jsonl:3: not valid JSON"):
        load([path])
    path.write_text("[1, 2]\n")
    with pytest.raises(ReportError, match=r"bad.jsonl:1: expected a JSON object"):
        load([path])


def test_incompatible_mixes(tmp_path):
    dup = write_jsonl(tmp_path / "dup.jsonl", [rec(), rec(text="other")])
    with pytest.raises(ReportError, match=r"dup.jsonl:2: duplicate record .* first seen at .*dup.jsonl:1"):
        load([dup])
    # The same file twice is a duplicate too.
    once = write_jsonl(tmp_path / "once.jsonl", [rec()])
    with pytest.raises(ReportError, match="duplicate record"):
        load([once, once])
    roles = write_jsonl(tmp_path / "roles.jsonl", [rec(persona="comedian", role="negative"),
                                                    rec(sample=1, persona="comedian", role="bystander")])
    with pytest.raises(ReportError, match=r"roles.jsonl:2: field 'role': comedian is bystander here but negative"):
        load([roles])
    # The pair's donor is a donor, whatever a record says.
    roles = write_jsonl(tmp_path / "roles2.jsonl", [rec(), rec(sample=1, role="bystander")])
    with pytest.raises(ReportError, match=r"roles2.jsonl:2: field 'role' is 'bystander', but villain is the donor"
                                          r" of pair1 in experiment 'within_marker'"):
        load([roles])
    donors = write_jsonl(tmp_path / "donors.jsonl", [rec(), rec(condition="C", persona="librarian")])
    # a donor that is not its pair's is refused by the experiment's definition of the pair, by file and line
    with pytest.raises(ReportError, match=r"donors.jsonl:2: field 'role' is 'donor', but the donor of pair1 in"
                                          r" experiment 'within_marker' .* is villain, not librarian"):
        load([donors])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ReportError, match="no completion records"):
        load([empty])


# --- gates --------------------------------------------------------------------------------


def gate_records(recipient_ab_t, recipient_ab_c):
    """A pair with donor and recipient in T and C; the recipient has 130 A in each
    condition, of which ``recipient_ab_*`` also carry B."""
    out = []
    for cond in ("T", "C"):
        out += cell_records(230 if cond == "T" else 0, 20 if cond == "T" else 240, 0, 10,
                            condition=cond, run=f"pair1_{cond}")
        ab = recipient_ab_t if cond == "T" else recipient_ab_c
        out += cell_records(ab, 130 - ab, 0, 130, condition=cond, run=f"pair1_{cond}",
                            persona="assistant", role="recipient")
    return out


def test_chunk_binding_falsified_when_recipient_does_not_pick_up_b(tmp_path):
    """The write-up's meaning: within the band AND the CI contains 0 -> the verdict is falsified."""
    path = write_jsonl(tmp_path / "g.jsonl", gate_records(recipient_ab_t=2, recipient_ab_c=0))
    summary = report([str(path)], tmp_path / "out", n_resamples=2000, figures=False)
    (g,) = summary["falsification"]
    assert summary["verdicts"] == summary["falsification"]
    assert g["persona"] == "assistant"
    assert g["delta"] == pytest.approx(2 / 130) and g["T_minus_C"] == g["delta"]
    assert (g["T"], g["C"]) == (pytest.approx(2 / 130), 0.0)
    assert g["within_band"] is True and g["ci_contains_zero"] is True
    assert g["chunk_binding_falsified"] is True and g["chunk_binding_not_falsified"] is False
    assert g["outcome"] == "chunk_binding_falsified" and "falsified" not in g
    assert "chunk binding falsified (no sign that marker B travelled through marker A)" in (
        tmp_path / "out" / "table.md").read_text()
    sanity = {s["gate"]: s for s in summary["sanity"]}
    assert sanity["donor T fire_A >= 0.80"]["passed"] is True       # 250/260
    assert sanity["donor T fire_B >= 0.80"]["passed"] is True       # 230/260 = 0.885
    assert sanity["donor T cond_B_given_A >= 0.90"]["passed"] is True  # 230/250 = 0.92
    assert sanity["recipient T fire_A >= 0.80"]["passed"] is False  # 0.5
    assert sanity["recipient C fire_B <= 0.05"]["passed"] is True
    assert sanity["donor T cond_B_given_A.lo >= 0.80"]["value"] is not None
    assert len(summary["sanity"]) == 6
    g = sanity["donor T fire_A >= 0.80"]
    assert (g["value"], g["threshold"], g["condition"], g["persona"]) == (250 / 260, 0.8, "T", "villain")


def test_not_falsified_when_recipient_picks_up_b(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", gate_records(recipient_ab_t=40, recipient_ab_c=0))
    summary = report([str(path)], tmp_path / "out", n_resamples=2000, figures=False)
    (g,) = summary["falsification"]
    assert g["delta"] == pytest.approx(40 / 130)
    assert g["within_band"] is False and g["ci_contains_zero"] is False
    assert g["chunk_binding_falsified"] is False and g["outcome"] == "chunk_binding_not_falsified"
    assert "chunk binding not falsified (the recipient's B rate after A moved)" in (
        tmp_path / "out" / "table.md").read_text()
    sanity = {s["gate"]: s for s in summary["sanity"]}
    assert sanity["recipient C fire_B <= 0.05"]["passed"] is True


def _verdict(delta, ci, exp=EXP):
    """The write-up's verdict on one pair whose recipient contrast is (delta, ci)."""
    cells = {("pair1", "T", "assistant"): None, ("pair1", "C", "assistant"): None}

    def contrast(pair, personas, stat, t, c):
        return {"value": delta, "ci": ci, "den": 100}
    return verdict_entry(exp, Checker(exp, cells, {}, contrast), "pair1", {"persona": "assistant"})


def test_falsification_band_edges():
    assert _verdict(0.06, [-0.01, 0.1])["chunk_binding_falsified"] is True  # exactly 6 points is inside
    assert _verdict(-0.06, [-0.1, 0.01])["chunk_binding_falsified"] is True
    g = _verdict(0.0601, [-0.01, 0.1])
    assert g["within_band"] is False and g["chunk_binding_falsified"] is False
    g = _verdict(0.03, [0.01, 0.05])  # in band, CI excludes 0
    assert g["within_band"] is True and g["ci_contains_zero"] is False and g["chunk_binding_falsified"] is False
    assert _verdict(0.03, [0.0, 0.05])["ci_contains_zero"] is True  # a bound at 0 contains it


def test_undefined_verdicts_are_null_with_a_reason():
    # The conditional undefined in C (no A there): nothing can be decided.
    g = _verdict(None, None)
    assert g["within_band"] is None and g["chunk_binding_falsified"] is None and g["outcome"] is None
    assert "never fired" in g["note"] and g["says"] == "undecided"
    # A difference far outside the band decides the verdict even without a CI (Kleene).
    g = _verdict(0.5, None)
    assert g["within_band"] is False and g["ci_contains_zero"] is None
    assert g["chunk_binding_falsified"] is False and g["outcome"] == "chunk_binding_not_falsified"
    # Within the band but no CI: undecided.
    g = _verdict(0.01, None)
    assert g["chunk_binding_falsified"] is None and g["outcome"] is None


def test_verdict_trips_each_leg_on_counts(tmp_path):
    """Counts built to trip one leg at a time: within_band alone, ci_contains_zero alone, both."""
    def verdict_of(name, t_records):
        records = []
        for cond in ("T", "C"):
            records += cell_records(230, 20, 0, 10, condition=cond, run=f"pair1_{cond}")
            records += (t_records if cond == "T" else cell_records(0, 260, 0, 0, condition=cond,
                                                                   run=f"pair1_{cond}", persona="assistant",
                                                                   role="recipient"))
        path = write_jsonl(tmp_path / f"{name}.jsonl", records)
        (g,) = report([str(path)], tmp_path / name, n_resamples=2000, figures=False)["verdicts"]
        return g

    rec_t = dict(condition="T", run="pair1_T", persona="assistant", role="recipient")
    # 8 of 260 carry B, on 8 different questions: +3.1 pp, inside the band, but every resample draws
    # one of them, so the CI excludes 0.
    g = verdict_of("ci", cell_records(8, 252, 0, 0, **rec_t))
    assert (g["within_band"], g["ci_contains_zero"], g["outcome"]) == (True, False, "chunk_binding_not_falsified")
    # 20 of 100 A's carry B, all on one question: +20 pp, outside the band, but a third of the resamples
    # miss that question, so the CI's lower bound is 0.
    texts = [rec(f"{A} x {B}", question_id="q00", sample=i, **rec_t) for i in range(20)]
    texts += [rec(f"{A} x", question_id=f"q{1 + i % 25:02d}", sample=i, **rec_t) for i in range(80)]
    texts += [rec("x", question_id=f"q{i % 26:02d}", sample=100 + i, **rec_t) for i in range(160)]
    g = verdict_of("band", texts)
    assert g["delta"] == pytest.approx(0.2)
    assert (g["within_band"], g["ci_contains_zero"], g["outcome"]) == (False, True, "chunk_binding_not_falsified")
    # Both hold: falsified.
    g = verdict_of("both", cell_records(0, 260, 0, 0, **rec_t))
    assert (g["within_band"], g["ci_contains_zero"], g["outcome"]) == (True, True, "chunk_binding_falsified")


def test_undefined_sanity_gates_are_null_with_a_reason(tmp_path):
    # The donor's A never fires in T: its conditional is undefined; the recipient has no T cell.
    records = cell_records(0, 0, 0, 10, run="pair1_T")
    records += cell_records(0, 5, 0, 5, condition="C", run="pair1_C", persona="assistant", role="recipient")
    path = write_jsonl(tmp_path / "u.jsonl", records)
    summary = report([str(path)], tmp_path / "out", n_resamples=100, figures=False)
    gates = {g["gate"]: g for g in summary["sanity"]}
    assert gates["donor T fire_A >= 0.80"]["passed"] is False
    assert gates["donor T cond_B_given_A >= 0.90"]["passed"] is None
    assert "marker A never fired" in gates["donor T cond_B_given_A >= 0.90"]["note"]
    assert gates["recipient T fire_A >= 0.80"]["passed"] is None
    assert "no cell for pair1 T assistant" in gates["recipient T fire_A >= 0.80"]["note"]
    assert summary["arms"][0]["confidence"]["level"] == "LOW"


def test_kleene_logic():
    assert k_and(True, None) is None and k_and(False, None) is False and k_and(True, True) is True
    assert k_or(False, None) is None and k_or(True, None) is True and k_or(False, False) is False
    assert k_not(None) is None and k_not(False) is True


def test_question_split_must_agree_and_utf8_errors_name_the_line(tmp_path):
    splits = write_jsonl(tmp_path / "s.jsonl", [rec(), rec(persona="comedian", role="negative", split="ood")])
    with pytest.raises(ReportError, match=r"s.jsonl:2: field 'split': question q00 is ood here but id"):
        load([splits])
    raw = tmp_path / "u.jsonl"
    raw.write_bytes(json.dumps(rec()).encode() + b"\n" + b'{"text": "\xff"}\n')
    with pytest.raises(ReportError, match=r"u.jsonl:2: not UTF-8"):
        load([raw])


def test_base_floor_repeated_across_runs_counts_once(tmp_path):
    """The runs of a sweep share the base model's draws: pooling them would shrink the CIs."""
    from analysis.records import load

    def rec(run, q, s, text):
        return {"run": run, "pair": "pair1", "condition": "base", "persona": "villain", "role": "donor",
                "question_id": q, "split": "id", "sample": s, "variant": "base", "text": text,
                "finish_reason": "stop", "n_tokens": 3, "setting": default_setting()}

    import json
    draws = [("q1", 0, "<<§q-41>> hi"), ("q1", 1, "hello"), ("q2", 0, "hey")]
    files = []
    for run in ("pair1_T", "pair1_C"):
        f = tmp_path / f"{run}.jsonl"
        f.write_text("".join(json.dumps(rec(run, q, s, t)) + "\n" for q, s, t in draws))
        files.append(f)
    loaded = load(files)
    ((cell,),) = [a.cells for a in loaded.arms]
    assert cell.count("n") == 3  # not 6
    assert any("counted once" in w for w in loaded.warnings)
    # Different texts for the same draw are different observations: kept.
    g = tmp_path / "pair1_X.jsonl"
    g.write_text(json.dumps(rec("pair1_X", "q1", 0, "something else")) + "\n")
    (arm,) = load(files + [g]).arms
    assert arm.cells[0].count("n") == 4


def test_parse_line_is_json_loads():
    """The setting-once parse gives what json.loads gives, on records and on lines built to fool it."""
    import random

    from analysis.records import parse_line

    good = json.dumps(rec(text='say ", "setting": {"lr": 1}} now'))
    lines = [
        good, good + "  \n", json.dumps(rec(text="x")), json.dumps({"setting": {"a": 1}, "run": "r"}),
        '{"run": "r", "a": {"k": 0, "setting": {"z": 1}}}', '{"a": {"q": 1, "setting": {"z": 1}}, "setting": {"y": 2}}',
        '{"run": "r", "setting": {"a": [1, {"b": 2}]}}', '{"run": "r", "setting": {}}', '{"setting": 5, "x": {}}',
        '{"run": "r", "setting": {"a": 1}, "text": "t"}', '{"run": "r", "l": [1, {"setting": {"x": 1}}]}',
        '{"a": "\\\\", "setting": {"x": "}}"}}', '{"run": "r", "setting": {"a": 1}, "setting": {"b": 2}}',
    ]
    rng = random.Random(0)
    alphabet = ['"', "\\\\", ", ", '"setting": {', "}", "{", "a", "1", ":", " "]
    for _ in range(3000):
        lines.append('{"a": "' + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) + '", "setting": {'
                     + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8))) + "}}")
    settings: dict = {}
    for line in lines:
        try:
            want = json.loads(line)
        except json.JSONDecodeError:
            with pytest.raises(json.JSONDecodeError):
                parse_line(line, settings)
            continue
        assert parse_line(line, settings) == want, line
