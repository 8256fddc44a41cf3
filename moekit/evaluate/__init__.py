"""Scoring models: open a model folder (`model_dir`), multiple-choice accuracy (`choices`), routing statistics
per dataset and modality (`routes`) and their plots."""

from moekit.evaluate.model_dir import ModelDir, open_model_dir

__all__ = ["ModelDir", "open_model_dir"]
