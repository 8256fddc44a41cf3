"""The data-layer tests share the session fixtures of tests/conftest.py (bundle, synth_dir, preprocessor)."""
