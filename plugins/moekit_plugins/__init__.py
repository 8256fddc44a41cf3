"""moekit's built-in plug-ins: teachers, position encoders and synergy heads.

Each area is its own entry point of the `moekit` group (`position`, `synergy`, `teachers`), loaded exactly like a
third-party plug-in; the core never imports this package.
"""
