"""train.cuda_graphs and the varlen flash attention on a real GPU (marked gpu: skipped without CUDA).

    python -m pytest -m gpu tests/test_gpu_graphs.py

The checks live in bench/gpu_tiny_check.py's graphs_check(), which the device runs as
`python3 bench/gpu_tiny_check.py --only-graphs`; this test runs the same function on a
machine whose pytest sees CUDA. The CPU side of the same code (the padded micro-batches
run eagerly) is tested in tests/test_fast_path.py.
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
    r = _gpu_tiny_check().graphs_check(steps=3)
    assert r["graphs_captured"] > 0
    assert r["graphs_vs_eager_loss"] < 1e-5 and r["graphs_vs_eager_grad"] < 1e-4  # the same kernels, replayed
    assert r["graphs_vs_fast_loss"] < 1e-2 and r["graphs_vs_fast_grad"] < 5e-2  # bf16 rounding apart
    assert r["varlen_vs_per_doc_attention"] < 1e-2
