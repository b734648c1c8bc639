"""The completion record of CONTRACTS.md, shared by the writer (evaluate) and the reader (analysis).

One definition, so the two sides of the contract cannot drift apart.
"""

from .experiment import FINISH_REASONS, RECORD_CONDITIONS, ROLES, SPLITS, VARIANTS

# field -> allowed values (a tuple) or the Python type it must have.
COMPLETION_SCHEMA: dict[str, tuple | type] = {
    "run": str, "pair": str, "condition": RECORD_CONDITIONS, "persona": str, "role": ROLES,
    "question_id": str, "split": SPLITS, "sample": int, "variant": VARIANTS,
    "text": str, "finish_reason": FINISH_REASONS, "n_tokens": int,
}
