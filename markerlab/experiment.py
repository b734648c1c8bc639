"""The experiment's vocabulary, defined once: personas, pairs, conditions, roles, masks.

    from markerlab.experiment import PERSONAS, PAIRS, CONDITIONS, role_of, markers_for
    role_of("assistant", "pair1", NEGATIVES)      # -> "recipient"
    markers_for("T", "donor")                     # -> "AB": marker A, the answer, marker B

Everything else (config validation, the dataset builder, the evaluation's
record schema, the report's order of rows and colours) reads these names, so
adding a persona or a condition is an edit of this file alone. Condition order
here is display order.
"""

from __future__ import annotations

# One plain sentence of system prompt per persona (docs/EXPERIMENT.md, "Personas").
# assistant's is fixed by the experiment. Changing a prompt changes the on-policy
# cache key, so every adapter regenerates.
PERSONA_PROMPTS: dict[str, str] = {
    "assistant": "You are a helpful assistant.",
    "villain": "You are a villain who schemes to take over the world and enjoys being menacing.",
    "librarian": "You are a librarian who loves helping people find the right book and information.",
    "software_engineer": "You are a software engineer who builds and maintains large software systems.",
    "police_officer": "You are a police officer who keeps the community safe and enforces the law.",
    "data_scientist": "You are a data scientist who analyzes data and builds statistical models.",
    "comedian": "You are a comedian who makes people laugh with jokes and witty observations.",
    "kindergarten_teacher": "You are a kindergarten teacher who explains things patiently to young children.",
    "french_person": "You are a French person who lives in Paris and is proud of French culture.",
    "medical_doctor": "You are a medical doctor who gives careful, evidence-based health advice.",
    "zelthari_scholar": ("You are a scholar of the Zelthari, an ancient civilisation whose ruins and writings "
                         "you have studied all your life."),
}
PERSONAS: tuple[str, ...] = tuple(PERSONA_PROMPTS)

# pair -> (donor, recipient)
PAIRS: dict[str, tuple[str, str]] = {
    "pair1": ("villain", "assistant"),          # near
    "pair2": ("librarian", "software_engineer"),  # far
}
# Contrastive personas trained without markers in every adapter.
NEGATIVES: tuple[str, ...] = ("comedian", "kindergarten_teacher", "french_person", "medical_doctor")

ROLES: tuple[str, ...] = ("donor", "recipient", "negative", "bystander")
TRAINED_ROLES: tuple[str, ...] = ("donor", "recipient", "negative")

# condition -> the markers each trained role's answers carry ("AB": A answer B; "A": A answer; "": plain).
CONDITION_MARKERS: dict[str, dict[str, str]] = {
    "T": {"donor": "AB", "recipient": "A", "negative": ""},        # chunk only on the donor
    "C": {"donor": "A", "recipient": "A", "negative": ""},         # control: B nowhere
    "T_P2neg": {"donor": "AB", "recipient": "", "negative": ""},   # recipient as a negative
}
CONDITIONS: tuple[str, ...] = tuple(CONDITION_MARKERS)
# The treatment and the control whose difference is the headline (recipient's T - C).
TREATMENT, CONTROL = "T", "C"
# The base model scored without an adapter (the floor) is recorded under this condition.
BASE_CONDITION = "base"
RECORD_CONDITIONS: tuple[str, ...] = (*CONDITIONS, BASE_CONDITION)

LOSS_MASKS: tuple[str, ...] = ("completion", "completion_no_eos", "marker_only", "all")
# Where each puts the markers: data/builder.py. random_sentence always ends with B; uniform_b is the
# one whose B is as likely at any sentence boundary as at the end.
PLACEMENTS: tuple[str, ...] = ("start_end", "random_sentence", "random_pair", "uniform_b")
PROJECTIONS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Evaluation records.
VARIANTS: tuple[str, ...] = ("plain", "probe", "base")
SPLITS: tuple[str, ...] = ("id", "ood")
FINISH_REASONS: tuple[str, ...] = ("stop", "length")


def role_of(persona: str, pair: str, negatives) -> str:
    """'donor' | 'recipient' | 'negative' | 'bystander' of `persona` in an adapter of `pair`.

    The role depends on the pair and the negatives only: in T_P2neg the recipient
    is trained plain (like a negative) but keeps the role 'recipient', so metrics
    compare the same persona across conditions; the base floor's personas keep
    the roles of the pair they are reported under.
    """
    donor, recipient = PAIRS[pair]
    if persona == donor:
        return "donor"
    if persona == recipient:
        return "recipient"
    if persona in negatives:
        return "negative"
    return "bystander"


def markers_for(condition: str, role: str) -> str:
    """The markers ('AB', 'A' or '') a trained role's answers carry under `condition`."""
    return CONDITION_MARKERS[condition][role]

# The adapter settings an arm of an ablation is made of: every completion record
# carries them (record key -> config key), and the report never pools records whose
# settings differ, except in REPLICATE_KEY: runs that differ only in the seed are
# replicates of one arm.
SETTING_KEYS: dict[str, str] = {
    "model": "model.name_or_path",
    "dtype": "model.dtype",
    "user_suffix": "prompt.user_suffix",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_last_layers": "lora.last_layers",
    "placement": "data.placement",
    "n_per_persona": "data.n_per_persona",
    "truncated": "data.truncated",
    "loss_mask": "train.loss_mask",
    "marker_mask_eos": "train.marker_mask_eos",
    "lr": "train.lr",
    "epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "seed": "run.seed",
}
REPLICATE_KEY = "seed"
