"""Architecture adapters: where each family keeps its decoder FFNs, visual special tokens and visual tokens."""

from moekit.arch.adapter import ArchAdapter, ArchError, FfnLayout, ffn_state_keys, ffn_tensors, resolve_arch
from moekit.arch.families import FAMILIES, Family, VisualSite, family_for, known_families
from moekit.arch.visual import TokenLayout, VisualHook, VisualItem, add_to_visual_tokens, visual_site

__all__ = [
    "FAMILIES",
    "ArchAdapter",
    "ArchError",
    "Family",
    "FfnLayout",
    "TokenLayout",
    "VisualHook",
    "VisualItem",
    "VisualSite",
    "add_to_visual_tokens",
    "family_for",
    "ffn_state_keys",
    "ffn_tensors",
    "known_families",
    "resolve_arch",
    "visual_site",
]
