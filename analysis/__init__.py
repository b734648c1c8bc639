"""Analysis of evaluation completions, for any experiment: per-cell metrics from the one marker
matcher (markerlab.markers), the question-cluster (and seeds-then-questions) bootstrap and Wilson
intervals, the experiment's gates and verdict, and the report (``python -m analysis.report``):
summary.json, report.md, table.md and figures, per arm of a sweep.

Every marker, condition, persona, metric and gate comes from the experiment file the records name
(markerlab.experiment; analysis.experiments finds it and checks its digest), so no module here
names one. Needs only the completion records of docs/contracts.md (plus, for run directories,
their experiment copy or config and the training data's position statistics); imports nothing
from the other markerlab stages except the experiment schema, the matcher, the record schema and
the question texts (data.questions).
"""
