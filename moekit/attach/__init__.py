"""The core side of every plug-in kind that joins a model: the visual-token hook position encoders use
(`visual`), position encoders built, fed, saved and loaded around a model (`position`), teachers and their
feature cache (`teachers`), and synergy heads prepared on a model (`synergy`)."""

from moekit.attach.visual import TokenLayout, VisualHook, VisualItem, add_to_visual_tokens, visual_site

__all__ = ["TokenLayout", "VisualHook", "VisualItem", "add_to_visual_tokens", "visual_site"]
