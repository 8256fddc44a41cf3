import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# One thread: the 2 cores are shared with other jobs, and oversubscribed intra-op threads made training
# tests ~20x slower (measured: a resume test 25 s with 2 threads, 1.2 s with 1).
torch.set_num_threads(1)

import moekit  # noqa: E402  (lets transformers find the moekit model types)
from moekit.demo.bundle import write_tiny_vlm  # noqa: E402
from moekit.demo.synth.writer import SynthSpec, write_synth  # noqa: E402
from moekit.demo.tiny import FAMILIES, VIDEO_FAMILIES, tiny_inputs, tiny_model  # noqa: E402

from .plugin_env import example_plugin, plugin_site  # noqa: E402, F401  (plug-in install fixtures)

VLM_FAMILIES = [f for f in FAMILIES if f not in ("qwen2", "qwen3", "llama", "mistral", "phi", "phi3")]


def family_inputs(family: str) -> list[tuple[str, dict]]:
    """Every input kind a tiny model of `family` takes: text, image (VLMs), video (video families)."""
    kinds = ["text"] + (["image"] if family in VLM_FAMILIES else []) + (["video"] if family in VIDEO_FAMILIES else [])
    return [(kind, tiny_inputs(family, kind, seed=3)) for kind in kinds]


@pytest.fixture
def tiny():
    return tiny_model


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="session")
def qwen_moe_dir(tmp_path_factory):
    """A saved tiny Qwen2.5-VL MoE checkpoint (4 layers, experts at 0 and 2) with its reference logits."""
    model = tiny_model("qwen2_5_vl")
    moe = moekit.upcycle(model, moekit.UpcycleSpec(layers="interval:2", num_experts=3, top_k=2))
    batch = tiny_inputs("qwen2_5_vl", "image", seed=3)
    out = tmp_path_factory.mktemp("ckpt") / "qwen-moe"
    moe.save_pretrained(out)
    return out, batch, logits(moe, batch)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A saved tiny dense Qwen2.5-VL (4 decoder layers) to train from."""
    out = tmp_path_factory.mktemp("base") / "qwen2_5_vl"
    tiny_model("qwen2_5_vl").save_pretrained(out)
    return out


# A tiny VLM bundle and a small synthetic dataset (session scoped), for the data, generation and eval tests.
SMALL = SynthSpec(images=6, videos=4, scenes=3, video_pairs=4, scene_pairs=3, eval_per_task=2, seed=7)


@pytest.fixture(scope="session")
def bundle(tmp_path_factory):
    return write_tiny_vlm(tmp_path_factory.mktemp("bundle") / "tiny-vlm")


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    write_synth(out, SMALL)
    return out


@pytest.fixture(scope="session")
def preprocessor(bundle):
    from moekit.data.preprocess import Preprocessor

    return Preprocessor.from_dir(bundle)
