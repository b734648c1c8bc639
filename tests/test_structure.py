"""The code's shape: no import cycle, every module importable on its own, no mutable module state in
trainer/, and the experiment's vocabulary in one experiment file (a new persona and condition need no code edit)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("markerlab", "lora", "data", "trainer", "evaluate", "analysis")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((REPO / pkg).glob("*.py")):
            out[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return out


def module_level_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The repository modules `name` imports when it is imported (not inside functions)."""
    pkg = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[:len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m in known and m != name}


def test_no_import_cycle():
    mods = modules()
    graph = {m: module_level_imports(m, p, set(mods)) for m, p in mods.items()}
    # a package's __init__ importing its own submodules is how packages re-export: not a cycle
    graph = {m: {d for d in deps if not (d.startswith(m + ".") and mods[m].stem == "__init__")}
             for m, deps in graph.items()}
    state, cycle = {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycle.append(path[path.index(d):] + [d] if d in path else [m, d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycle, f"import cycles: {cycle}"


def test_every_module_imports_on_its_own():
    """Each module in an interpreter where none of ours is loaded yet (third-party ones may be)."""
    names = sorted(modules())
    script = textwrap.dedent(f"""
        import importlib, sys
        ours = {PACKAGES!r}
        failed = []
        for name in {names!r}:
            for m in [m for m in sys.modules if m.split(".")[0] in ours]:
                del sys.modules[m]
            try:
                importlib.import_module(name)
            except Exception as e:
                failed.append(f"{{name}}: {{type(e).__name__}}: {{e}}")
        print("\\n".join(failed))
        sys.exit(1 if failed else 0)
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]


def test_trainer_keeps_no_mutable_module_state():
    for f in sorted((REPO / "trainer").glob("*.py")):
        tree = ast.parse(f.read_text())
        assert not [n for n in ast.walk(tree) if isinstance(n, ast.Global)], f"{f.name}: a global statement"
        for node in tree.body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
                    continue
                mutable = (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)
                assert not isinstance(node.value, mutable), f"{f.name}:{node.lineno}: a mutable module-level value"


def test_a_new_persona_and_condition_are_one_experiment_file(tmp_path):
    """A copy of the write-up's experiment file with a persona and a condition added, and nothing else: the
    config, the record schema, the dataset's templates and the report accept them (no .py file changes)."""
    from analysis.report import report
    from analysis.synthetic import write_runs
    from data.personas import system_prompt
    from markerlab.config import config_from_dict
    from markerlab.experiment import SHIPPED_DIR, load_experiment
    from markerlab.records import COMPLETION_SCHEMA

    text = (SHIPPED_DIR / "within_marker.toml").read_text()
    text = text.replace('name = "within_marker"', 'name = "with_pirate"')
    text = text.replace("[pairs]", 'pirate = "You are a pirate who sails the seven seas."\n\n[pairs]', 1)
    text += '\n[conditions.T_both]\ndonor = "{A} {answer} {B}"\nrecipient = "{A} {answer} {B}"\nnegative = "{answer}"\n'
    path = tmp_path / "with_pirate.toml"
    path.write_text(text)
    exp = load_experiment(path)
    cfg = config_from_dict({"run": {"experiment": str(path)}, "data": {"pair": "pair1", "condition": "T_both"},
                            "eval": {"personas": ["pirate", "villain", "assistant"]}})
    assert cfg.data.condition == "T_both" and "pirate" in cfg.eval.personas
    assert exp.conditions["T_both"].markers("recipient") == ("A", "B")
    assert exp.role_of("pirate", "pair1", ()) == "bystander"
    assert COMPLETION_SCHEMA["condition"] is str and system_prompt(exp, "pirate").startswith("You are a pirate")
    write_runs(tmp_path / "runs", conditions=("T", "C", "T_both"), experiment=exp)
    s = report([str(tmp_path / "runs")], tmp_path / "report", n_resamples=50, figures=True, jobs=1,
               experiments=[str(path)])
    conds = {c["condition"] for c in s["cells"]}
    personas = {c["persona"] for c in s["cells"]}
    assert "T_both" in conds and "pirate" in personas, (conds, personas)
