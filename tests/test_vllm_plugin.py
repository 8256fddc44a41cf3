"""plugins/moekit-vllm reads moekit's checkpoints: its config classes take a real moekit config.json (only
transformers is needed for that part; serving itself is checked with vLLM in tests/test_serving.py)."""

import importlib
import json
import sys
from pathlib import Path

import pytest

import moekit
from moekit.demo.tiny import tiny_model

sys.path.insert(0, str(Path(__file__).parents[1] / "plugins" / "moekit-vllm"))
plugin_config = importlib.import_module("moekit_vllm.config")
sys.path.pop(0)


@pytest.mark.parametrize(
    ("family", "config_class"), [("qwen2_5_vl", "MoekitQwen2_5_VLConfig"), ("qwen2", "MoekitQwen2Config")]
)
def test_the_plugin_reads_the_moe_layout_moekit_writes(family, config_class, tmp_path):
    spec = moekit.UpcycleSpec(layers="interval:2:1", num_experts=3, top_k=2, shared_expert=True)
    moekit.upcycle(tiny_model(family), spec).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    cls = getattr(plugin_config, config_class)
    assert data["model_type"] == cls.model_type
    config = cls.from_pretrained(tmp_path)
    layout = plugin_config.MoeLayout.of(config.get_text_config())
    assert layout == plugin_config.MoeLayout(
        layers=(1, 3),
        num_experts=3,
        top_k=2,
        intermediate_size=config.get_text_config().intermediate_size,
        shared_expert=True,
    )
    json.loads(config.to_json_string())  # the layout keeps the config serialisable (vLLM hashes it)


def test_a_record_the_plugin_cannot_serve_is_refused_by_name():
    record = {"format": 1, "layers": [0], "intermediate_size": 8, "spec": {"num_experts": 2}, "biased": False}
    with pytest.raises(ValueError, match=r"config.json: the moekit record lacks moekit.spec.top_k"):
        plugin_config.MoeLayout.from_record(record)
    record["spec"]["top_k"] = 1
    record["biased"] = True
    with pytest.raises(ValueError, match="bias-free gated"):
        plugin_config.MoeLayout.from_record(record)
