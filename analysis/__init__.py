"""Analysis of evaluation completions: per-cell metrics from the one marker matcher
(markerlab.markers), the question-cluster (and seeds-then-questions) bootstrap, the
gates, and the report (``python -m analysis.report``): summary.json, report.md,
table.md and figures, per arm of a sweep.

Needs only the completion records of docs/contracts.md (plus, for run directories, the
training data's position statistics); imports nothing from the other markerlab
stages except the marker strings, the record schema, the question texts
(data.questions) and the training-example reader (data.records).
"""
