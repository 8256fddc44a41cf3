"""One strict config language (pydantic models with located errors, YAML loading, --set overrides), and the two
records moekit keeps beside what it writes: `MoeRecord` (config.moekit) and `Provenance` (moekit.json)."""

from moekit.config.base import ConfigError, StrictModel, apply_overrides, load_yaml, parse_config
from moekit.config.provenance import Provenance, read_provenance, write_provenance
from moekit.config.record import MoeRecord

__all__ = [
    "ConfigError",
    "MoeRecord",
    "Provenance",
    "StrictModel",
    "apply_overrides",
    "load_yaml",
    "parse_config",
    "read_provenance",
    "write_provenance",
]
