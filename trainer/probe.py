"""The leakage probe: each persona's teacher-forced log-probability of the headline's markers while training.

    from trainer.probe import load_probe
    probe = load_probe(cfg, run_dir, tokenizer)            # None when train.probe_every = 0 (or no probe set)
    rec = probe.maybe(step, total, model, device, writer)  # a record at probe steps, else None
    rec = probe.measure(model, device)                     # the numbers now, whatever the step

trainer.train calls it at step 0 (before any update), every `train.probe_every`
optimizer steps and at the last step. The documents are data/probe.json
(data/probe.py: the base model's greedy answer of every persona to a few held-out
eval questions), tokenized by data.tokenize.encode_example, the function and the
chat template training uses, and packed into rows (trainer/pack.py) of
`train.probe_batch_size` documents whose logits are computed by
trainer/loss.token_losses at the marker positions only.

Per document the log-probability of a marker is the sum of its tokens' log-probs
(which tokens are the marker's comes from its character span, as in training).
For the experiment's headline pair (X, Y), e.g. (A, B) of cond_B_given_A:

    logp_X_start    marker X as the first tokens of the answer      ("XY" document)
    logp_Y_after_X  marker Y right after `X + " " + answer + " "`   ("XY" document)
    logp_Y_end      marker Y right after `answer + " "`             ("Y" document)

A persona's value is the mean over its questions (`p_*`: the mean probability,
exp of each question's log-prob, averaged); a role's is the mean of its personas'.
TensorBoard scalars: probe/<role>/<persona>/<metric> and probe/<role>/<metric>;
train_summary.json: "probe", one record per probe step
{"step", "seconds", "personas": {persona: {"role", metric: value}}, "roles": {role: {metric: value}}}.

It changes nothing in training: it runs in eval mode (no LoRA dropout, so no draw
from the dropout generator) under torch.no_grad, reads neither the data-order
generator nor the global RNGs, and puts the model back in train mode. So training
losses and the adapter are bitwise the same with the probe on or off, and a probe's
numbers depend only on the weights of its step (identical across a resume). The
per-document sums are taken on the CPU in float64 in a fixed order (no atomics).

Cost. By FLOPs a probe call is small: 11 personas x 2 questions x 2 documents = 44
documents of <= ~161 tokens (system + question + template, a <= 96-token answer,
markers), forward only, against training's 225 steps x 16 examples x ~420 tokens,
each a forward and a backward. But training replays CUDA graphs (and compiled
layers) while the probe runs eagerly, so on a GPU it costs far more than its FLOPs
say (docs/benchmarks.md: 3 questions every 25 steps cost 9-15% of training on a GPU).
Hence the defaults: 2 questions every 75 steps (steps 0, 75, 150, 225: 4 calls of 44
documents, about a quarter of that). Every run records the measured share
in train_summary.json ("probe_share": probe seconds / training seconds) and warns
when it exceeds 5%.
Off with train.probe_every = 0 (the data stage then builds no probe set either).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from types import MappingProxyType

import torch

from data.probe import probe_examples, read_probe_set
from data.tokenize import encode_example
from trainer.attention import Documents
from trainer.loss import token_losses
from trainer.pack import pack
from markerlab.rundir import RunDir

SHARE_WARN = 0.05  # warn when the measured probe time exceeds this share of training time


def due(step: int, every: int, total: int) -> bool:
    """Is `step` (finished optimizer steps) a probe step: 0, every `every` steps, and the last one."""
    return every > 0 and (step % every == 0 or step == total)


def warn(msg: str) -> None:
    """The probe's warnings go to stderr: stdout carries the trainer's own lines."""
    print(f"[train] warning: {msg}", file=sys.stderr, flush=True)


def probe_metrics(pair: tuple[str, str]) -> MappingProxyType:
    """metric -> (document kind, span selector in trainer.pack), for the probed marker pair (X, Y)."""
    x, y = pair
    return MappingProxyType({f"logp_{x}_start": (f"{x}{y}", f"marker:{x}"),
                             f"logp_{y}_after_{x}": (f"{x}{y}", f"marker:{y}"),
                             f"logp_{y}_end": (y, f"marker:{y}")})


def load_probe(cfg, run_dir, tokenizer, log=warn) -> "Probe | None":
    """The run's probe, tokenized as training tokenizes; None when off or when the run has no probe set."""
    if cfg.train.probe_every == 0:
        return None
    if cfg.experiment.headline_pair is None:
        log(f"experiment {cfg.experiment.name}: its headline metric {cfg.experiment.headline.metric} is not about a "
            f"marker pair, so there is nothing for the leakage probe to watch; train.probe_every = 0 turns it off")
        return None
    path = RunDir(run_dir).probe_set
    if not path.is_file():
        log(f"{path}: no probe set (the data stage builds it), so no leakage probe in this run; "
            f"train.probe_every = 0 turns the probe off")
        return None
    exp = cfg.experiment
    return Probe(read_probe_set(path, exp), exp, tokenizer, cfg.train.probe_every, cfg.train.probe_batch_size, path)


class Probe:
    def __init__(self, probe_set: dict, exp, tokenizer, every: int, batch_size: int, path=None):
        self.every, self.batch_size, self.path = every, batch_size, path
        self.metrics = probe_metrics(exp.headline_pair)
        self.prefix = None  # a trainer.prefix.FrozenPrefix of self.docs, when training has one (use_prefix)
        self.docs, self.labels = [], []  # Encoded, (kind, persona, role, question_id)
        for kind, ex in probe_examples(probe_set, exp):
            # marker_only: the LM head runs only where a marker's (or the end of turn's) token is predicted
            self.docs.append(encode_example(ex, tokenizer, loss_mask="marker_only"))
            self.labels.append((kind, ex["persona"], ex["role"], ex["question_id"]))

    def use_prefix(self, model, first: int, device) -> None:
        """Under lora.last_layers: the probe's documents too go through the frozen layers once."""
        from trainer.prefix import FrozenPrefix

        self.prefix = FrozenPrefix.build(model, first, self.docs, self.batch_size, device)

    @property
    def n_tokens(self) -> int:
        return sum(len(d) for d in self.docs)

    def maybe(self, step: int, total: int, model, device, writer=None) -> dict | None:
        """At a probe step: measure, log to `writer` (TensorBoard) and return the record; else None."""
        if not due(step, self.every, total):
            return None
        t0 = time.perf_counter()
        rec = {"step": step, **self.measure(model, device)}
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        rec["seconds"] = time.perf_counter() - t0
        if writer is not None:
            for tag, value in scalars(rec, self.metrics):
                writer.add_scalar(tag, value, step)
        return rec

    def measure(self, model, device) -> dict:
        """{"personas": ..., "roles": ...} (module docstring) for the model's current weights."""
        per_doc = self.document_logps(model, device)
        # (persona, metric) -> per-question log-probs, in the probe set's order
        values: dict[tuple[str, str], list[float]] = {}
        roles: dict[str, str] = {}
        for (kind, persona, role, _), logp in zip(self.labels, per_doc):
            roles[persona] = role
            for metric, (want_kind, sel) in self.metrics.items():
                if kind == want_kind:
                    values.setdefault((persona, metric), []).append(logp[sel])
        personas = {}
        for persona, role in roles.items():
            rec = {"role": role}
            for metric in self.metrics:
                xs = values[(persona, metric)]
                rec[metric] = sum(xs) / len(xs)
                rec["p" + metric[4:]] = sum(math.exp(x) for x in xs) / len(xs)
            personas[persona] = rec
        by_role = {}
        for role in dict.fromkeys(roles.values()):
            members = [r for r in personas.values() if r["role"] == role]
            by_role[role] = {m: sum(r[m] for r in members) / len(members) for m in metric_names(self.metrics)}
        return {"personas": personas, "roles": by_role}

    def summary(self, history: list[dict], train_seconds: float, log=warn) -> dict:
        """The train_summary.json fields: the records and the measured cost (a warning above SHARE_WARN)."""
        seconds = sum(r["seconds"] for r in history)
        ratio = seconds / train_seconds if train_seconds else None
        if ratio is not None and ratio > SHARE_WARN:
            log(f"the leakage probe took {ratio:.1%} of the training time; raise train.probe_every or lower "
                f"train.probe_n_questions / train.probe_max_tokens")
        return {"probe_set": str(self.path), "probe_seconds": seconds, "probe_share": ratio, "probe": history}

    @torch.no_grad()
    def document_logps(self, model, device) -> list[dict[str, float]]:
        """Per document, {"marker:<X>": log P(X's tokens), ...} for the probed pair's markers, teacher-forced."""
        was_training = model.training
        model.eval()  # LoRA dropout off: no mask is drawn, the dropout generator is not touched
        try:
            out = []
            for i in range(0, len(self.docs), self.batch_size):
                batch = pack(self.docs[i:i + self.batch_size])
                dev_batch = batch.to(device)
                ce, sel = token_losses(model, dev_batch, Documents.of(batch.doc_lens, device, model.dtype),
                                       prefix=self.prefix)
                ce = ce.double().cpu()
                # pack() lists a row's targets document by document: cut them at the documents' ends
                ends = torch.tensor(batch.doc_lens).cumsum(0)
                doc_of = torch.bucketize(batch.pred, ends, right=True)
                counts = torch.bincount(doc_of, minlength=len(batch.doc_lens)).tolist()
                names = sorted({sel for _, sel in self.metrics.values()})
                pieces = {k: (-ce * batch.sel[k].double()).split(counts) if k in batch.sel else None for k in names}
                for d in range(len(counts)):  # a marker no document of this row carries: 0 (no tokens)
                    out.append({k: float(v[d].sum()) if v is not None else 0.0 for k, v in pieces.items()})
            return out
        finally:
            model.train(was_training)


def metric_names(metrics) -> list[str]:
    return [*metrics, *("p" + m[4:] for m in metrics)]


def scalars(rec: dict, metrics):
    """(TensorBoard tag, value) pairs of one probe record."""
    for persona, values in rec["personas"].items():
        for m in metric_names(metrics):
            yield f"probe/{values['role']}/{persona}/{m}", values[m]
    for role, values in rec["roles"].items():
        for m in metric_names(metrics):
            yield f"probe/{role}/{m}", values[m]

