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
