"""One strict config language: pydantic models with located errors, YAML loading and --set overrides."""

from moekit.config.base import ConfigError, StrictModel, apply_overrides, load_yaml, parse_config

__all__ = ["ConfigError", "StrictModel", "apply_overrides", "load_yaml", "parse_config"]
