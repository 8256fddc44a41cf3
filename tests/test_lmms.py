"""lmms-eval with moekit's adapter (plugins/moekit-lmms), in its own venv (bench/lmms_check.py makes it)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("lmms_check", ROOT / "bench" / "lmms_check.py")
lmms_check = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = lmms_check
spec.loader.exec_module(lmms_check)
# Replies the two MMStar rules read differently (docs/evaluation.md): the authors' first-character rule
# (moekit) against lmms-eval's ranked letter search; "white" is moekit's option-text fallback.
KNOWN = {"Answer: D", "I think it is C", "blue", "option b", "white"}


@pytest.mark.slow
def test_lmms_eval_runs_moekit_models_and_scores_like_moekit_where_the_rules_agree():
    result = lmms_check.check(ROOT / "bench" / "out" / "lmms")
    assert result["questions"] == 4 and result["same_predictions"] == 4  # token-for-token the same answers
    assert set(result["replies_scored_differently"]) <= KNOWN, result
    assert result["scored_the_same"] >= result["scored"] - 6 * 4
