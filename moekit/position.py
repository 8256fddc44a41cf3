"""Moved to `moekit.attach.position` in moekit 0.2; this path warns and goes away in 0.3."""

from moekit.config.deprecation import moved

__getattr__ = moved(__name__, "moekit.attach.position")
