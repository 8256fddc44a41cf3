"""Architecture knowledge: where a dense decoder keeps its layers and FFNs (`adapter`), the table of families
moekit knows (`families`) and the lookup that adds plug-in families (`lookup`)."""

from moekit.arch.adapter import ArchAdapter, ArchError, FfnLayout, ffn_state_keys, ffn_tensors, resolve_arch
from moekit.arch.families import FAMILIES
from moekit.arch.lookup import family_for, known_families
from moekit.config.deprecation import moved
from moekit.plugins.family import Family, VisualSite

__all__ = [
    "FAMILIES",
    "ArchAdapter",
    "ArchError",
    "Family",
    "FfnLayout",
    "VisualSite",
    "family_for",
    "ffn_state_keys",
    "ffn_tensors",
    "known_families",
    "resolve_arch",
]

# Moved in 0.2: the visual-token hook is the core side of position encoders.
__getattr__ = moved(
    __name__,
    {
        n: "moekit.attach.visual"
        for n in ("TokenLayout", "VisualHook", "VisualItem", "add_to_visual_tokens", "visual_site")
    },
)
