"""Merge and evaluation stages of markerlab.

    from evaluate import merge, verify_merged, evaluate
    check = merge(cfg, run_dir)        # run_dir/adapter -> run_dir/merged, verified (merge_check.json)
    result = evaluate(cfg, run_dir)    # -> run_dir/eval/completions.jsonl + run_result.json

`evaluate.merge` builds and verifies the merged checkpoint; `evaluate.eval`
samples and records every completion. Each module's docstring says how.
"""

from .eval import evaluate, expected_count, plan, validate_record
from .merge import MergeCheckError, merge, verify_merged

__all__ = ["MergeCheckError", "evaluate", "expected_count", "merge", "plan", "validate_record", "verify_merged"]
