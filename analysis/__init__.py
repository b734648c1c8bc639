"""Analysis of evaluation completions: marker matching, per-cell metrics, the
question-cluster bootstrap, the gates, and the report (``python -m analysis.report``).

Needs only the completion records of CONTRACTS.md; imports nothing from the
other markerlab stages except the marker strings.
"""
