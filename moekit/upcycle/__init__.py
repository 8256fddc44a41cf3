"""Upcycling: the spec, layer layouts, expert sources and the surgery."""

from moekit.upcycle.layout import resolve_layers
from moekit.upcycle.spec import ArchOverride, ExpertSpec, RouterSpec, UpcycleSpec
from moekit.upcycle.surgery import upcycle

__all__ = ["ArchOverride", "ExpertSpec", "RouterSpec", "UpcycleSpec", "resolve_layers", "upcycle"]
