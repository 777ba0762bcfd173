"""Which checkpoint to publish.

The rule (CyberHarem's, written into every model card by `SELECTION_RULE`):

1. Every saved checkpoint renders the same preview prompts with the same seeds.
2. Fidelity F (RecScore: how often the identity model takes a preview for the character,
   relative to how often it does so within the dataset itself) and prompt following P
   (tagger confidence on the tags each prompt asks for, among those it knows) are
   combined by the weighted harmonic mean F_beta = (1 + beta^2) * F * P / (beta^2 * P + F),
   with beta = 3: fidelity counts beta^2 = 9 times as much as prompt following, so a step
   that draws the character wins, but of two equally faithful steps the one that still
   obeys prompts wins.
3. When an artefact gate is set, a step whose artefact score (mean probability the
   corruption classifier gives to "corrupted") is above the gate cannot be chosen.
4. The step with the highest F_beta wins; on a tie the earlier step wins (less training,
   less over-fitting for the same score). The baseline row (step 0: the base model without
   the LoRA) is a reference, never a candidate.
"""

from __future__ import annotations

import math

import pandas as pd

DEFAULT_BETA = 3.0
# The RecScore row of the base model without the LoRA, rendered with the same prompts and
# seeds: what the checkpoints must beat.
BASELINE_STEP = 0

SELECTION_RULE = (
    "Each checkpoint renders the same preview prompts with the same seeds. Fidelity F is the "
    "share of (preview, dataset image) pairs the identity model calls the same character, "
    "divided by that share within the dataset itself (clipped to [0, 1]); prompt following P "
    "is the tagger's mean confidence on the tags each prompt asks for (among those it knows). "
    "The chosen step "
    "maximises F_beta = (1 + beta^2) * F * P / (beta^2 * P + F) with beta = {beta:g} (fidelity "
    "weighted beta^2 times more than prompt following){gate}; ties go to the earlier step."
)


def fbeta_score(fidelity: float, prompt_following: float, beta: float = DEFAULT_BETA) -> float:
    """Weighted harmonic mean of fidelity and prompt following, fidelity weighted beta^2 times."""
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    for name, value in (("fidelity", fidelity), ("prompt_following", prompt_following)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    beta2 = beta * beta
    denominator = beta2 * prompt_following + fidelity
    if denominator == 0.0:
        return 0.0
    return (1.0 + beta2) * fidelity * prompt_following / denominator


def selection_rule_text(beta: float = DEFAULT_BETA, artefact_gate: float | None = None) -> str:
    """The rule in words, with the parameters actually used (for the model card)."""
    gate = "" if artefact_gate is None else (
        f", among the steps whose artefact score is at most {artefact_gate:g}"
    )
    return SELECTION_RULE.format(beta=beta, gate=gate)


def choose_step(
    table: pd.DataFrame, beta: float = DEFAULT_BETA, artefact_gate: float | None = None
) -> int:
    """The step to publish from a RecScore table (columns step, fidelity, prompt_following,
    and artefact when `artefact_gate` is set), by the rule in this module's docstring.

    The F_beta score is recomputed here from fidelity and prompt following with `beta`,
    so the choice never depends on a stale `score` column.
    """
    required = ["step", "fidelity", "prompt_following"] + (["artefact"] if artefact_gate is not None else [])
    missing = [name for name in required if name not in table.columns]
    if missing:
        raise ValueError(f"choose_step: the RecScore table lacks column(s) {missing}")
    if table.empty:
        raise ValueError("choose_step: the RecScore table has no checkpoints; train the LoRA first")
    candidates = table[table["step"] != BASELINE_STEP]
    if candidates.empty:
        raise ValueError("choose_step: the RecScore table has only the baseline row; train the LoRA first")
    if artefact_gate is not None:
        artefact = pd.to_numeric(candidates["artefact"], errors="coerce")
        if artefact.isna().all():
            raise ValueError(
                "choose_step: an artefact gate was set but no checkpoint has an artefact score; "
                "configure the artefact classifier or set artefact_gate=None"
            )
        candidates = candidates[artefact <= artefact_gate]
        if candidates.empty:
            raise ValueError(
                f"choose_step: no checkpoint passes the artefact gate {artefact_gate:g} "
                f"(lowest artefact score {artefact.min():.3f}); inspect the previews, "
                "or raise the gate"
            )
    best_step: int | None = None
    best_score = -math.inf
    for row in candidates.sort_values("step").itertuples(index=False):
        score = fbeta_score(float(row.fidelity), float(row.prompt_following), beta)
        if score > best_score:  # strict: an equal score later on does not displace an earlier step
            best_step, best_score = int(row.step), score
    assert best_step is not None
    return best_step
