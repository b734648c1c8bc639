"""train.cuda_graphs and the varlen flash attention on a real GPU (marked gpu: skipped without CUDA).

    python -m pytest -m gpu tests/test_gpu_graphs.py

The checks live in bench/gpu_tiny_check.py's graphs_check(), which the device runs as
`python3 bench/gpu_tiny_check.py --only-graphs`; this test runs the same function on a
machine whose pytest sees CUDA. The CPU side of the same code (the padded micro-batches
run eagerly) is tested in tests/test_training_path.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _gpu_tiny_check():
    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_tiny_check.py"
    spec = importlib.util.spec_from_file_location("gpu_tiny_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_graph_replay_equals_eager_and_varlen_equals_per_document_attention():
    mod = _gpu_tiny_check()
    failed = [name for name, ok in mod.graph_checks_pass(mod.graphs_check(steps=3)).items() if not ok]
    assert not failed
