"""Sharded loading: each FSDP2 process reads only its rows of the decoder layers, and gets exactly the
parameters, buffers and losses of loading the whole model first."""

import json
import sys
from pathlib import Path

import pytest
import torch

import moekit
from moekit.demo.tiny import tiny_model
from moekit.modeling.sharded import ShardedLoadError, load_deferred, materialize
from moekit.train.outputs import load_model

from .recipes import losses, stage, write_recipe
from .test_train_distributed import torchrun


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    """A tiny Qwen2.5-VL MoE with 3 experts at layers 0 and 2: 3 rows over 2 processes shard unevenly."""
    moe = moekit.upcycle(tiny_model("qwen2_5_vl"), moekit.UpcycleSpec(layers="interval:2", num_experts=3, top_k=2))
    out = tmp_path_factory.mktemp("sharded") / "moe"
    moe.save_pretrained(out)
    return out


def test_deferred_load_leaves_only_the_layers_on_meta_and_fills_them_exactly(moe_dir):
    whole = load_model(moe_dir, where="t")
    model, weights = load_deferred(moe_dir)
    meta = {n for n, p in model.named_parameters() if p.is_meta}
    assert meta and all(n.startswith("model.language_model.layers.") for n in meta)
    assert any(".experts." in n for n in meta)
    reference = dict(whole.named_parameters())
    for name, param in model.named_parameters():
        if name not in meta:
            assert torch.equal(param, reference[name]), name
    assert materialize(weights, torch.device("cpu")) == len(meta)  # plain tensors: read whole
    for name, param in model.named_parameters():
        assert param.dtype == torch.float32 and torch.equal(param, reference[name]), name
    for (name, buffer), other in zip(model.named_buffers(), whole.buffers(), strict=True):
        assert torch.equal(buffer, other), name
    batch = {k: v for k, v in moekit.demo.tiny.tiny_inputs("qwen2_5_vl", "image", seed=3).items()}
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, whole(**batch).logits, rtol=0, atol=0)


def test_rows_read_are_the_rows_of_the_whole_tensor(moe_dir):
    model, weights = load_deferred(moe_dir)
    name = next(n for n, p in model.named_parameters() if ".experts." in n and p.is_meta)
    full = weights.read(name)
    assert full.shape[0] == 3
    torch.testing.assert_close(torch.cat([weights.read(name, (0, 2)), weights.read(name, (2, 3))]), full)
    assert weights.read(name, (3, 3)).shape == (0, *full.shape[1:])


def test_a_checkpoint_missing_a_tensor_cannot_load_by_shards_and_loads_whole(moe_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for file in moe_dir.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    (shard,) = broken.glob("*.safetensors")
    state = load_file(str(shard))
    dropped = next(k for k in state if "mlp.router" in k or "gate" in k)
    del state[dropped]
    save_file(state, str(shard), metadata={"format": "pt"})
    with pytest.raises(ShardedLoadError, match="no tensor for parameter"):
        load_deferred(broken)


@pytest.mark.distributed
def test_fsdp2_sharded_load_matches_whole_load_on_two_processes(tmp_path, moe_dir):
    spec = stage(
        "moe",
        **{"from": {"path": str(moe_dir)}},
        trainable=["router", "experts", "projector"],
        steps=3,
        grad_accum=2,
        losses={"load_balancing": 0.0},
        data_params={"kinds": ["text", "image"], "num_samples": 12},
        distributed={"mode": "fsdp2"},
    )
    recipe = write_recipe(tmp_path, moe_dir, [spec])
    worker = str(Path(__file__).with_name("sharded_load_worker.py"))
    torchrun(str(moe_dir), str(recipe), str(tmp_path), script=worker)
    ranks = [json.loads((tmp_path / f"params-{r}.json").read_text()) for r in (0, 1)]
    for result in ranks:
        assert result["params"] > 50 and not result["differ"] and not result["buffers_differ"]
        assert not result["whole_meta"] and any(".experts." in n for n in result["deferred"])
        assert result["local_numel"] < 0.75 * result["total_numel"]  # each process holds its share only
    assert ranks[0]["gathered_differ"] == []
    sharded, whole = tmp_path / "sharded" / "moe", tmp_path / "whole" / "moe"
    for key in ("loss", "loss/ce", "grad_norm"):
        assert losses(sharded, key) == pytest.approx(losses(whole, key), rel=1e-6), key
    assert len(losses(sharded)) == 3
    saved = [moekit.load(d / "model") for d in (sharded, whole)]
    for (name, a), b in zip(saved[0].named_parameters(), saved[1].parameters(), strict=True):
        assert torch.equal(a, b), name


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
