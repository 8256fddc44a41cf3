"""moekit: upcycle dense Hugging Face vision-language models into sparse Mixture-of-Experts models.

import moekit
model = moekit.upcycle(dense, moekit.UpcycleSpec(layers="interval:4", num_experts=4, top_k=2))
model.save_pretrained("out")
model = moekit.load("out")   # or AutoModelForImageTextToText.from_pretrained("out") after `import moekit`
moekit.generate("out", "What is in the image?", images=["cat.png"])
"""

from moekit._version import __version__
from moekit.modeling.classes import install_lazy_registration
from moekit.modeling.load import load
from moekit.moe import RouterLosses, RoutingStats, router_losses
from moekit.plugins.hooks import Component, hookimpl
from moekit.upcycle import ArchOverride, ExpertSpec, RouterSpec, UpcycleSpec, upcycle

install_lazy_registration()


def generate(model, messages, **options):  # noqa: ANN001, ANN201 (the signature is moekit.evaluate.generate's)
    """The model's answer to a prompt or chat messages; see `moekit.evaluate.generate.generate`."""
    from moekit.evaluate.generate import generate as run

    return run(model, messages, **options)


__all__ = [
    "ArchOverride",
    "Component",
    "ExpertSpec",
    "RouterLosses",
    "RouterSpec",
    "RoutingStats",
    "UpcycleSpec",
    "__version__",
    "generate",
    "hookimpl",
    "load",
    "router_losses",
    "upcycle",
]
