"""The streamed save (decoder layers written as they are gathered) writes what `save_pretrained` writes: the same
tensors under the same names, the same config, and a checkpoint that loads back in transformers."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import moekit
from moekit.arch import resolve_arch
from moekit.demo.shrink import tiny_model_any
from moekit.demo.tiny import FAMILIES, tiny_model
from moekit.train import stream_save
from moekit.train.module import TrainModule
from moekit.train.stream_save import layer_stream


def saved_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, checking that the index (if any) names the file each one is in."""
    index = directory / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"] if index.is_file() else None
    out = {}
    for file in sorted(directory.glob("model*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118
                assert key not in out, key
                out[key] = fh.get_tensor(key)
                if weight_map is not None:
                    assert weight_map[key] == file.name, key
    if weight_map is not None:
        assert set(weight_map) == set(out)
        size = json.loads(index.read_text())["metadata"]["total_size"]
        assert size == sum(t.numel() * t.element_size() for t in out.values())
    return out


def streamed(model, directory: Path, **save_kwargs) -> list[str]:
    """Save `model` the streamed way into `directory`; the keys gathered, in order."""
    module = TrainModule(model)
    state = module.state_dict()
    keys = {id(t): k for k, t in module.state_dict(keep_vars=True).items()}
    order: list[str] = []

    def gather(tensor):
        order.append(keys[id(tensor)])
        return tensor.detach().clone()

    stream = layer_stream(module, resolve_arch(model).layers, gather)
    assert stream is not None
    rest = {k.removeprefix("model."): v for k, v in state.items() if k not in stream.saved}
    model.save_pretrained(directory, state_dict=rest, **save_kwargs)
    stream.write(directory, model)
    assert order == list(stream.saved)  # each once, in the order every process gathers them
    return order


def assert_same_checkpoint(reference: Path, candidate: Path) -> None:
    for name in ("config.json", "generation_config.json"):
        if (reference / name).is_file():
            assert json.loads((candidate / name).read_text()) == json.loads((reference / name).read_text()), name
    a, b = saved_tensors(reference), saved_tensors(candidate)
    assert sorted(b) == sorted(a)
    for key, tensor in a.items():
        assert b[key].dtype == tensor.dtype and torch.equal(b[key], tensor), key


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_streamed_save_writes_what_save_pretrained_writes(family, moe, tmp_path):
    model = tiny_model(family)
    if moe:
        model = moekit.upcycle(model, moekit.UpcycleSpec(layers="interval:2", num_experts=3, top_k=2))
    model.save_pretrained(tmp_path / "whole")
    order = streamed(model, tmp_path / "streamed")
    layers = [n for n in model.state_dict() if n.startswith(resolve_arch(model).layers + ".")]
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_parameters"] == model.num_parameters()
    assert len(order) >= 0.9 * len(layers)  # nearly every layer tensor streams (all but converted ones)
    assert_same_checkpoint(tmp_path / "whole", tmp_path / "streamed")
    loaded = (moekit.load if moe else type(model).from_pretrained)(tmp_path / "streamed")
    reference = model.state_dict()
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("model_type", ["hrm_text", "molmo2"])
def test_tensors_a_conversion_fuses_are_saved_with_the_rest(model_type, tmp_path):
    model = tiny_model_any(model_type)  # q/k/v and gate/up saved fused: those layer tensors cannot stream
    model.save_pretrained(tmp_path / "whole")
    order = streamed(model, tmp_path / "streamed")
    layers = [n for n in model.state_dict() if n.startswith(resolve_arch(model).layers + ".")]
    assert 0 < len(order) < len(layers)
    assert_same_checkpoint(tmp_path / "whole", tmp_path / "streamed")


def test_shards_are_renumbered_into_one_index(tmp_path, monkeypatch):
    model = moekit.upcycle(tiny_model("qwen2_5_vl"), moekit.UpcycleSpec(layers="interval:2", num_experts=3, top_k=2))
    monkeypatch.setattr(stream_save, "MAX_SHARD_BYTES", 40_000)
    model.save_pretrained(tmp_path / "whole")
    streamed(model, tmp_path / "streamed", max_shard_size="100KB")  # the rest is sharded too
    files = sorted(p.name for p in (tmp_path / "streamed").glob("model*.safetensors"))
    count = len(files)
    assert count > 4 and files == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert_same_checkpoint(tmp_path / "whole", tmp_path / "streamed")


def test_tied_and_converted_tensors_stay_with_the_rest():
    model = tiny_model("qwen2_5_vl")
    module = TrainModule(model)
    layer = module.model.model.language_model.layers[0]
    layer.mlp.up_proj.weight = layer.mlp.gate_proj.weight  # a tie inside a layer: left to save_pretrained
    stream = layer_stream(module, resolve_arch(model).layers, lambda tensor: tensor)
    prefix = "model.model.language_model.layers.0.mlp."
    assert f"{prefix}gate_proj.weight" not in stream.saved and f"{prefix}up_proj.weight" not in stream.saved
    assert stream.saved[f"{prefix}down_proj.weight"] == "model.layers.0.mlp.down_proj.weight"  # renamed as saved
    assert not any(".visual." in k or "embed_tokens" in k for k in stream.saved)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
