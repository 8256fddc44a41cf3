"""CSQA (PolyV Appendix B.1): cross-vision question-answer pairs from paired scene graphs.

Loaders read the released layouts of PVSG (`pvsg`), Action Genome (`action_genome`) and 3DSSG over 3RScan
(`threedssg`) into `graphs.PairedGraph`s; `rules` (the default) or a generator model (`generate`) writes QAs;
`verify` keeps those a VLM agrees with; `build` runs it all (`moekit csqa build`). Texts live in `templates`.
"""

from moekit.csqa.build import BuildSpec, build_csqa
from moekit.csqa.graphs import LayoutError, PairedGraph

__all__ = ["BuildSpec", "LayoutError", "PairedGraph", "build_csqa"]
