"""Sharded loading: each FSDP2 or ZeRO-3 process reads only its part of the decoder layers, and gets exactly the
parameters, buffers and losses of loading the whole model first."""

import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moekit
from moekit.arch import resolve_arch
from moekit.demo.tiny import tiny_model
from moekit.modeling.sharded import ShardedLoadError, load_deferred, materialize, materialize_module
from moekit.train.outputs import load_model

from .recipes import losses, stage, write_recipe
from .test_stream_save import assert_same_checkpoint, saved_tensors
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


def test_layers_filled_one_module_at_a_time_equal_the_whole_load(moe_dir):
    reference = dict(load_model(moe_dir, where="t").named_parameters())
    model, weights = load_deferred(moe_dir)
    layers = list(model.get_submodule(resolve_arch(model).layers))
    filled = [materialize_module(weights, layer, torch.device("cpu")) for layer in layers]
    assert all(filled) and sum(filled) == len([n for n in reference if ".layers." in n and "language" in n])
    for name, param in model.named_parameters():
        assert not param.is_meta and torch.equal(param, reference[name]), name
    assert materialize(weights, torch.device("cpu")) == 0  # nothing left on meta


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


def two_process_run(
    tmp_path: Path, moe_dir: Path, mode: str, distributed: dict, kinds: list[str], precision: str = "fp32"
) -> list[dict]:
    """Three steps both ways on 2 processes (the recipe in `precision`); each process's comparison of the two
    loads right after wrapping (fp32)."""
    spec = stage(
        "moe",
        **{"from": {"path": str(moe_dir)}},
        trainable=["router", "experts", "projector"],
        steps=3,
        grad_accum=2,
        losses={"load_balancing": 0.0},
        data_params={"kinds": kinds, "num_samples": 12},
        distributed=distributed,
        precision=precision,
    )
    recipe = write_recipe(tmp_path, moe_dir, [spec])
    worker = str(Path(__file__).with_name("sharded_load_worker.py"))
    torchrun(str(moe_dir), str(recipe), str(tmp_path), mode, script=worker)
    return [json.loads((tmp_path / f"params-{r}.json").read_text()) for r in (0, 1)]


def assert_same_runs(tmp_path: Path) -> None:
    sharded, whole = tmp_path / "sharded" / "moe", tmp_path / "whole" / "moe"
    for key in ("loss", "loss/ce", "grad_norm"):
        assert losses(sharded, key) == pytest.approx(losses(whole, key), rel=1e-6), key
    assert len(losses(sharded)) == 3
    saved = [moekit.load(d / "model") for d in (sharded, whole)]
    for (name, a), b in zip(saved[0].named_parameters(), saved[1].parameters(), strict=True):
        assert torch.equal(a, b), name
    assert_same_checkpoint(whole / "model", sharded / "model")  # the same files' tensors, names and config
    index = sharded / "model" / "model.safetensors.index.json"
    if index.is_file():  # as save_pretrained counts them (ZeRO-3's partitions hide their full size)
        assert json.loads(index.read_text())["metadata"]["total_parameters"] == saved[1].num_parameters()


def streamed_save(run: Path) -> bool:
    """Whether a stage output was written with its decoder layers streamed (their own shards after the rest)."""
    return (run / "model" / "model.safetensors.index.json").is_file()


@pytest.mark.distributed
def test_fsdp2_sharded_load_matches_whole_load_on_two_processes(tmp_path, moe_dir):
    ranks = two_process_run(tmp_path, moe_dir, "fsdp2", {"mode": "fsdp2"}, ["text", "image"])
    for result in ranks:
        assert result["params"] > 50 and not result["differ"] and not result["buffers_differ"]
        assert not result["whole_meta"] and any(".experts." in n for n in result["deferred"])
        assert result["local_numel"] < 0.75 * result["total_numel"]  # each process holds its share only
    assert ranks[0]["gathered_differ"] == []
    assert_same_runs(tmp_path)
    assert streamed_save(tmp_path / "sharded" / "moe") and not streamed_save(tmp_path / "whole" / "moe")


@pytest.mark.distributed
def test_fsdp2_streamed_save_of_a_model_with_tied_embeddings(tmp_path):
    """Gemma 3 ties its head to the input embedding: the streamed save keeps one of the two, as transformers
    does, and writes the same checkpoint as gathering the whole model."""
    moe = moekit.upcycle(tiny_model("gemma3"), moekit.UpcycleSpec(layers="interval:2", num_experts=3, top_k=2))
    moe.save_pretrained(tmp_path / "moe_in")
    two_process_run(tmp_path, tmp_path / "moe_in", "fsdp2", {"mode": "fsdp2"}, ["text"])
    assert_same_runs(tmp_path)
    assert streamed_save(tmp_path / "sharded" / "moe")
    assert "lm_head.weight" not in saved_tensors(tmp_path / "sharded" / "moe" / "model")


@pytest.mark.distributed
def test_fsdp2_in_bf16_keeps_frozen_bf16_weights_in_bf16_with_the_same_losses_and_output(tmp_path):
    """A checkpoint stored in bf16 (as released models are): under `precision: bf16` the frozen shards stay bf16,
    the routers train with fp32 masters, and losses and the saved model equal those of fp32 shards."""
    moe = moekit.upcycle(tiny_model("qwen2_5_vl"), moekit.UpcycleSpec(layers="interval:2", num_experts=3, top_k=2))
    moe.to(torch.bfloat16).save_pretrained(tmp_path / "moe_in")
    spec = stage(
        "moe",
        **{"from": {"path": str(tmp_path / "moe_in")}},
        trainable=["router"],
        steps=3,
        grad_accum=2,
        losses={"load_balancing": 0.0},
        data_params={"kinds": ["text", "image"], "num_samples": 12},
        distributed={"mode": "fsdp2"},
        precision="bf16",
    )
    recipe = write_recipe(tmp_path, tmp_path / "moe_in", [spec])
    worker = str(Path(__file__).with_name("sharded_load_worker.py"))
    torchrun(str(tmp_path / "moe_in"), str(recipe), str(tmp_path), "frozen", script=worker)
    for rank in (0, 1):
        dtypes = json.loads((tmp_path / f"dtypes-{rank}.json").read_text())  # name -> (dtype, trained)
        routers = {n: d for n, (d, trained) in dtypes.items() if trained}
        assert routers and set(routers.values()) == {"torch.float32"}
        frozen = {n: d for n, (d, trained) in dtypes.items() if not trained}
        assert any(".experts." in n for n in frozen) and set(frozen.values()) == {"torch.bfloat16"}
    sharded, whole = tmp_path / "sharded" / "moe", tmp_path / "whole" / "moe"
    for key in ("loss", "loss/ce", "grad_norm"):
        assert losses(sharded, key) == losses(whole, key), key  # the same bf16 compute: equal, not close
    assert_same_checkpoint(whole / "model", sharded / "model")


@pytest.mark.slow  # DeepSpeed builds its ops on first use (a minute); ~20 s each once built
@pytest.mark.distributed
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_zero3_sharded_load_matches_whole_load_on_two_processes(tmp_path, moe_dir, precision):
    # ZeRO-3 gathers a module's weights only in its forward: every process sees images (docs/training.md).
    zero3 = {"mode": "deepspeed", "zero_stage": 3}
    ranks = two_process_run(tmp_path, moe_dir, "zero3", zero3, ["image"], precision)
    for result in ranks:
        assert result["params"] > 50 and not result["differ"] and not result["buffers_differ"]
        assert not result["whole_meta"] and any(".experts." in n for n in result["deferred"])
        assert result["local_numel"] < 0.75 * result["total_numel"]  # each process holds its partitions
    assert ranks[0]["gathered"] > 50 and ranks[0]["gathered_differ"] == []
    assert_same_runs(tmp_path)
    assert streamed_save(tmp_path / "sharded" / "moe") and not streamed_save(tmp_path / "whole" / "moe")


HEAP_PROBE = """
import ctypes, sys
from moekit.train.engine import bound_host_heap

class Info(ctypes.Structure):  # glibc's struct mallinfo2: hblkhd is the bytes held in mmapped blocks
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(n, ctypes.c_size_t) for n in names.split()]

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.mallinfo2.restype = ctypes.c_void_p, Info
print(bound_host_heap(sys.argv[1]))
libc.free(ctypes.c_void_p(libc.malloc(16 << 20)))  # a freed 16 MiB mmapped block raises a dynamic threshold
before = libc.mallinfo2().hblkhd
block = libc.malloc(1 << 20)
print(libc.mallinfo2().hblkhd - before >= 1 << 20)  # the next 1 MiB block: mmapped (returned at free) or heap
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
@pytest.mark.parametrize(("mode", "bounded"), [("fsdp2", True), ("deepspeed", True), ("ddp", False)])
def test_sharded_modes_keep_large_blocks_out_of_the_heap(mode, bounded):
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    result = subprocess.run(
        [sys.executable, "-c", HEAP_PROBE, mode], env=env, capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.split() == [str(bounded), str(bounded)]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
