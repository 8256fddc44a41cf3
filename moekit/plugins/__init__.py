"""The plug-in system: hookspecs and the types plug-ins return (`hooks`, `family`), discovery through the `moekit`
entry-point group (`registry`), and the component references recipes and specs use (`refs`). The core knows
plug-ins only through this package."""

from moekit.plugins.family import Family, VisualSite
from moekit.plugins.hooks import KINDS, Component, Kind, hookimpl

__all__ = ["KINDS", "Component", "Family", "Kind", "VisualSite", "hookimpl"]
