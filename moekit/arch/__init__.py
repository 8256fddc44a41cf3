"""Architecture adapters: where each family keeps its decoder FFNs and visual special tokens."""

from moekit.arch.adapter import ArchAdapter, ArchError, FfnLayout, ffn_state_keys, ffn_tensors, resolve_arch
from moekit.arch.families import FAMILIES, Family

__all__ = [
    "FAMILIES",
    "ArchAdapter",
    "ArchError",
    "Family",
    "FfnLayout",
    "ffn_state_keys",
    "ffn_tensors",
    "resolve_arch",
]
