"""evaluation.selection: F-beta step choice with an artefact gate."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lora_factory.evaluation.selection import (
    BASELINE_STEP,
    choose_step,
    fbeta_score,
    selection_rule_text,
)


def table(rows: list[tuple[int, float, float, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["step", "fidelity", "prompt_following", "artefact"])


def test_fbeta_is_the_weighted_harmonic_mean():
    assert fbeta_score(1.0, 1.0) == pytest.approx(1.0)
    assert fbeta_score(0.0, 0.9) == 0.0
    assert fbeta_score(0.0, 0.0) == 0.0
    assert fbeta_score(0.9, 0.3, beta=3.0) == pytest.approx(10 * 0.27 / (9 * 0.3 + 0.9))
    assert fbeta_score(0.9, 0.3, beta=1.0) == pytest.approx(2 * 0.27 / 1.2)
    with pytest.raises(ValueError, match="fidelity"):
        fbeta_score(1.5, 0.5)


def test_beta_three_favours_fidelity_where_f1_would_not():
    # Step 100 draws the character but follows prompts less; step 200 is balanced.
    scores = table([(100, 0.9, 0.3, np.nan), (200, 0.7, 0.7, np.nan)])
    assert choose_step(scores, beta=3.0) == 100
    assert choose_step(scores, beta=1.0) == 200


def test_ties_go_to_the_earlier_step_whatever_the_row_order():
    scores = table([(300, 0.8, 0.5, np.nan), (100, 0.8, 0.5, np.nan), (200, 0.6, 0.5, np.nan)])
    assert choose_step(scores) == 100


def test_the_score_column_is_recomputed_not_trusted():
    scores = table([(100, 0.2, 0.2, np.nan), (200, 0.9, 0.9, np.nan)]).assign(score=[1.0, 0.0])
    assert choose_step(scores) == 200


def test_artefact_gate_excludes_corrupted_steps():
    scores = table([(100, 0.5, 0.5, 0.1), (200, 0.95, 0.8, 0.6), (300, 0.7, 0.7, 0.2)])
    assert choose_step(scores) == 200
    assert choose_step(scores, artefact_gate=0.3) == 300
    with pytest.raises(ValueError, match="no checkpoint passes the artefact gate"):
        choose_step(scores, artefact_gate=0.05)


def test_gate_without_artefact_scores_and_empty_tables_are_errors():
    with pytest.raises(ValueError, match="no checkpoint has an artefact score"):
        choose_step(table([(100, 0.5, 0.5, np.nan)]), artefact_gate=0.3)
    with pytest.raises(ValueError, match="no checkpoints"):
        choose_step(table([]))
    with pytest.raises(ValueError, match="prompt_following"):
        choose_step(pd.DataFrame({"step": [1], "fidelity": [0.5]}))


def test_rule_text_names_its_parameters():
    assert "beta = 3" in selection_rule_text(3.0)
    assert "at most 0.3" in selection_rule_text(3.0, artefact_gate=0.3)


def test_the_baseline_row_is_never_chosen():
    # The base model without the LoRA is only the reference, even when it scores best.
    rows = table([(BASELINE_STEP, 0.9, 0.9, 0.0), (100, 0.2, 0.5, 0.0), (200, 0.4, 0.5, 0.0)])
    assert choose_step(rows) == 200
    with pytest.raises(ValueError, match="only the baseline row"):
        choose_step(table([(BASELINE_STEP, 0.9, 0.9, 0.0)]))


def test_the_artefact_gate_reads_the_checkpoints_not_the_baseline():
    # The baseline's clean previews neither let a gate pass nor show up as the lowest score.
    rows = table([(BASELINE_STEP, 0.1, 0.9, 0.01), (100, 0.5, 0.5, 0.5), (200, 0.6, 0.5, 0.4)])
    with pytest.raises(ValueError, match=r"lowest artefact score 0\.400"):
        choose_step(rows, artefact_gate=0.3)
    unscored = table([(BASELINE_STEP, 0.1, 0.9, 0.01), (100, 0.5, 0.5, np.nan)])
    with pytest.raises(ValueError, match="no checkpoint has an artefact score"):
        choose_step(unscored, artefact_gate=0.3)
