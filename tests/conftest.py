"""Shared fixtures: the built-in tiny model (real Qwen2.5 tokenizer, random weights)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# One cache per checkout, built on first use; subprocesses inherit it.
os.environ.setdefault("MARKERLAB_CACHE", str(REPO / ".cache" / "markerlab"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from markerlab.models import tiny_model_dir as build

    return build()


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from markerlab.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def pytest_sessionfinish(session, exitstatus):
    """In CI a skipped test is a failure: the vLLM tests in particular must run there.

    Only tests marked `gpu` may skip (CI has no GPU).
    """
    if not os.environ.get("CI"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = [r for r in (reporter.stats.get("skipped", []) if reporter else [])
               if "gpu" not in getattr(r, "keywords", {})]
    if skipped and exitstatus == 0:
        reporter.write_line(f"CI: {len(skipped)} test(s) skipped that must run here:", red=True)
        for r in skipped:
            reporter.write_line(f"  {r.nodeid}: {r.longrepr[-1] if isinstance(r.longrepr, tuple) else r.longrepr}")
        session.exitstatus = 1
