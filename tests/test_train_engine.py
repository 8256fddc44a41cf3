"""Engine settings that need no second process: modes, AdamW groups, the DeepSpeed config the recipe implies."""

import json
from types import SimpleNamespace

import pytest
from torch import nn

from moekit.recipe.schema import Distributed, Optimizer
from moekit.train.deepspeed_engine import deepspeed_config
from moekit.train.engine import param_groups, resolve_mode


def test_auto_mode_follows_the_process_count():
    assert resolve_mode(Distributed(), 1) == "single"
    assert resolve_mode(Distributed(), 4) == "ddp"
    assert resolve_mode(Distributed(mode="fsdp2"), 4) == "fsdp2"
    with pytest.raises(ValueError, match="mode is single but 2 processes"):
        resolve_mode(Distributed(mode="single"), 2)


def test_matrices_decay_and_vectors_do_not():
    module = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    trainable = {"0.weight", "0.bias", "1.weight"}
    decay, plain = param_groups(module, trainable, Optimizer(lr=1e-3, weight_decay=0.1))
    assert [p.shape for p in decay["params"]] == [(4, 4)] and decay["weight_decay"] == 0.1
    assert len(plain["params"]) == 2 and plain["weight_decay"] == 0.0
    (everything,) = param_groups(module, trainable, Optimizer(lr=1e-3, weight_decay=0.1, decay_1d=True))
    assert len(everything["params"]) == 3


def engine(**config):
    return SimpleNamespace(
        micro_batch=2, grad_accum=4, world_size=8, precision="bf16", config=Distributed(mode="deepspeed", **config)
    )


def test_deepspeed_config_comes_from_the_recipe_and_merges_a_user_file(tmp_path):
    config = deepspeed_config(engine(zero_stage=3))
    assert config["train_batch_size"] == 64 and config["zero_optimization"] == {"stage": 3}
    assert config["bf16"] == {"enabled": True}
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}))
    merged = deepspeed_config(engine(zero_stage=3, deepspeed_config=str(user)))
    assert merged["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"}}
    user.write_text(json.dumps({"gradient_accumulation_steps": 2}))
    with pytest.raises(ValueError, match="gradient_accumulation_steps=2 contradicts the recipe \\(4\\)"):
        deepspeed_config(engine(deepspeed_config=str(user)))
    user.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ValueError, match="the recipe sets the optimizer"):
        deepspeed_config(engine(deepspeed_config=str(user)))


def test_deepspeed_buckets_follow_the_model_width_as_transformers_trainer_sizes_them(tmp_path):
    zero = deepspeed_config(engine(zero_stage=3), width=256)["zero_optimization"]
    assert zero == {
        "stage": 3,
        "reduce_bucket_size": 65536,
        "stage3_prefetch_bucket_size": 58982,
        "stage3_param_persistence_threshold": 2560,
    }
    assert deepspeed_config(engine(zero_stage=2), width=256)["zero_optimization"] == {
        "stage": 2,
        "reduce_bucket_size": 65536,
    }
    user = tmp_path / "ds.json"
    given = {"reduce_bucket_size": 1000, "stage3_param_persistence_threshold": "auto"}
    user.write_text(json.dumps({"zero_optimization": given}))
    zero = deepspeed_config(engine(zero_stage=3, deepspeed_config=str(user)), width=256)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 1000 and zero["stage3_param_persistence_threshold"] == 2560
    with pytest.raises(ValueError, match=r"ds.json: zero_optimization.stage3_param_persistence_threshold is 'auto'"):
        deepspeed_config(engine(zero_stage=3, deepspeed_config=str(user)))
