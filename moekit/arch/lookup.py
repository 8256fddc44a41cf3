"""Find the facts of a family: moekit's own table first, then the families plug-ins add."""

from __future__ import annotations

from moekit.arch.families import FAMILIES
from moekit.plugins import registry as plugin_registry
from moekit.plugins.family import Family


def plugin_families() -> dict[str, Family]:
    """The families installed plug-ins add; one that redefines a built-in family is an error."""
    reg = plugin_registry.registry()
    added = reg.families()
    for model_type in added:
        if model_type in FAMILIES:
            raise ValueError(
                f"plug-in {reg.family_plugin(model_type)!r} defines family {model_type!r}, which moekit's built-in "
                "table already defines"
            )
    return added


def family_for(model_type: str) -> Family | None:
    """The built-in family, else one a plug-in adds through `moekit_arch_adapters`, else None."""
    return FAMILIES.get(model_type) or plugin_families().get(model_type)


def known_families() -> list[str]:
    """Every model type moekit can resolve: the built-in table plus plug-in families."""
    return sorted({*FAMILIES, *plugin_families()})
