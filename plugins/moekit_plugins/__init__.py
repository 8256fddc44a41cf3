"""moekit's built-in plug-ins: teachers, position encoders and synergy heads.

Loaded through the `moekit` entry-point group exactly like a third-party plug-in; the core never imports this
package.
"""
