"""Shared fixtures of the data-layer tests: a tiny VLM bundle and a small synthetic dataset (session scoped)."""

import pytest

from moekit.demo.bundle import write_tiny_vlm
from moekit.demo.synth.writer import SynthSpec, write_synth

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
