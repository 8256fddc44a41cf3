"""lmms-eval's entry point: the manifest of the `moekit` model. Kept free of heavy imports (lmms-eval loads
every plug-in's entry point in one try block; an import error here would hide the plug-ins after it)."""

from __future__ import annotations

from pathlib import Path

TASKS = Path(__file__).parent / "tasks"  # pass to `lmms-eval --include_path`


def manifests():
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest("moekit", simple_class_path="moekit_lmms.model.Moekit")]
