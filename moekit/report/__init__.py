"""The report `moekit run` writes after a pipeline: loss curves, routing by modality, parameters, accuracy."""

from moekit.report.build import build_report

__all__ = ["build_report"]
