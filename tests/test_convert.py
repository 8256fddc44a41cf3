"""Streaming conversion (`moekit upcycle`): equal to in-memory upcycling, safe output, clear refusals."""

import errno
import json

import peft
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
from typer.testing import CliRunner

import moekit
from moekit.cli.app import app
from moekit.demo.tiny import FAMILIES, tiny_model, write_tiny_checkpoint
from moekit.io.reader import CheckpointError
from moekit.upcycle.convert import convert

from .conftest import VLM_FAMILIES, family_inputs, logits


def _spec(paths, **extra):
    experts = [
        {"name": "image", "source": str(paths["image"]), "noise_scale": 0.01},
        {"name": "video", "source": str(paths["video"]), "reinit_ratio": 0.25, "seed": 5},
        {"name": "base"},
    ]
    return moekit.UpcycleSpec(base=str(paths["base"]), layers="interval:2", top_k=2, experts=experts, **extra)


def _dense(family, path):
    auto = AutoModelForImageTextToText if family in VLM_FAMILIES else AutoModelForCausalLM
    return auto.from_pretrained(path).eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_streamed_checkpoint_equals_in_memory_upcycle(family, tmp_path):
    paths = write_tiny_checkpoint(tmp_path / "src", family, ["image", "video"], seed=1)
    spec = _spec(paths)
    convert(spec, tmp_path / "moe", progress=False)
    in_memory = moekit.upcycle(_dense(family, paths["base"]), spec)
    loaded = moekit.load(tmp_path / "moe")
    for kind, batch in family_inputs(family):
        torch.testing.assert_close(
            logits(loaded, batch), logits(in_memory, batch), atol=1e-6, rtol=0, msg=f"{family} {kind}"
        )
    image_ffn = safe_open(paths["image"] / "model.safetensors", "pt")
    key = next(k for k in image_ffn.keys() if ".0.mlp." in k and k.endswith(("down_proj.weight", "fc2.weight")))
    block = loaded.get_submodule(moekit.arch.resolve_arch(loaded).layers)[0].mlp
    assert not torch.equal(block.experts.down_proj[0], image_ffn.get_tensor(key))  # noise was applied
    torch.testing.assert_close(block.experts.down_proj[0], image_ffn.get_tensor(key), atol=0.05, rtol=0)


def test_output_folder_contents_and_provenance(tmp_path):
    paths = write_tiny_checkpoint(tmp_path / "src", "qwen2_5_vl", ["image", "video"])
    (paths["base"] / "tokenizer_config.json").write_text("{}")
    (paths["base"] / "chat_template.jinja").write_text("{{ messages }}")
    report = convert(_spec(paths), tmp_path / "moe", progress=False, max_shard_bytes=60_000)
    out = tmp_path / "moe"
    names = sorted(p.name for p in out.iterdir())
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert {
        "config.json",
        "generation_config.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "moekit.json",
        "model.safetensors.index.json",
    } <= set(names)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == report.bytes_written
    record = json.loads((out / "moekit.json").read_text())
    assert record["made_by"] == "moekit upcycle" and record["moekit_version"] == moekit.__version__
    assert record["spec"]["experts"][1]["reinit_ratio"] == 0.25 and record["moe_layers"] == [0, 2]
    assert record["sources"]["image"]["kind"] == "ffn_only" and len(record["sources"]["base"]["fingerprint"]) == 16
    meta = json.loads((out / "config.json").read_text())["moekit"]
    assert meta["sources"] == record["sources"] and meta["moekit_version"] == moekit.__version__
    assert not list(tmp_path.glob(".moe.*"))


def test_lora_adapter_is_merged_into_its_expert(tmp_path):
    paths = write_tiny_checkpoint(tmp_path / "src", "llama", [])
    dense = _dense("llama", paths["base"])
    config = peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj", "q_proj"], init_lora_weights=False
    )
    lora = peft.get_peft_model(dense, config)
    lora.save_pretrained(tmp_path / "lora")
    merged = lora.merge_and_unload()
    spec = moekit.UpcycleSpec(
        base=str(paths["base"]),
        layers=[1, 3],
        top_k=1,
        experts=[{"name": "tuned", "source": str(tmp_path / "lora")}, {"name": "base"}],
    )
    convert(spec, tmp_path / "moe", progress=False)
    experts = moekit.load(tmp_path / "moe").model.layers[3].mlp.experts
    ffn = merged.model.layers[3].mlp
    torch.testing.assert_close(
        experts.gate_up_proj[0], torch.cat([ffn.gate_proj.weight, ffn.up_proj.weight]), atol=1e-6, rtol=1e-5
    )
    torch.testing.assert_close(experts.down_proj[0], ffn.down_proj.weight, atol=1e-6, rtol=1e-5)
    base_ffn = _dense("llama", paths["base"]).model.layers[3].mlp
    torch.testing.assert_close(experts.down_proj[1], base_ffn.down_proj.weight, atol=0, rtol=0)


def test_full_specialists_are_compared_and_averaged(tmp_path):
    paths = write_tiny_checkpoint(tmp_path / "src", "llama", [])
    tuned = _dense("llama", paths["base"])
    with torch.no_grad():
        tuned.model.layers[0].self_attn.q_proj.weight.add_(0.5)
        tuned.model.layers[2].mlp.down_proj.weight.mul_(2)
    tuned.save_pretrained(tmp_path / "full")
    spec = moekit.UpcycleSpec(
        base=str(paths["base"]),
        layers="full",
        top_k=1,
        non_expert="average",
        experts=[{"name": "full", "source": str(tmp_path / "full")}, {"name": "base"}],
    )
    with pytest.warns(
        UserWarning,
        match=r"expert 'full' changed 1 non-FFN tensor group.*model.layers.\*.self_attn.q_proj.weight by 0.5.*averaged",
    ):
        report = convert(spec, tmp_path / "moe", progress=False)
    assert report.divergence["full"]["model.layers.*.self_attn.q_proj.weight"] == pytest.approx(0.5)
    assert report.divergence["full"]["model.layers.*.self_attn.k_proj.weight"] == 0.0
    moe = moekit.load(tmp_path / "moe")
    base = _dense("llama", paths["base"])
    torch.testing.assert_close(
        moe.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight + 0.25
    )
    torch.testing.assert_close(
        moe.model.layers[2].mlp.experts.down_proj[0], 2 * base.model.layers[2].mlp.down_proj.weight
    )


def _assert_refused(spec, out, match, error=Exception, **kwargs):
    with pytest.raises(error, match=match):
        convert(spec, out, progress=False, **kwargs)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


def test_bad_sources_are_refused_before_writing(tmp_path):
    paths = write_tiny_checkpoint(tmp_path / "src", "qwen2", ["image", "video"])
    out = tmp_path / "moe"
    spec = _spec(paths)
    _assert_refused(
        spec.model_copy(
            update={
                "experts": [spec.experts[0].model_copy(update={"source": str(tmp_path / "nope")}), *spec.experts[1:]]
            }
        ),
        out,
        "source .*nope.* does not exist",
    )
    # truncated and corrupted safetensors
    image_file = paths["image"] / "model.safetensors"
    data = image_file.read_bytes()
    image_file.write_bytes(data[: len(data) - 100])
    _assert_refused(spec, out, r"image/model.safetensors: not a readable safetensors file", CheckpointError)
    image_file.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    _assert_refused(spec, out, r"not a readable safetensors file", CheckpointError)
    image_file.write_bytes(data)
    # a specialist of another architecture, and one of another size
    other = write_tiny_checkpoint(tmp_path / "llama", "llama", ["x"])
    bad = spec.model_copy(
        update={"experts": [spec.experts[0].model_copy(update={"source": str(other["base"])}), *spec.experts[1:]]}
    )
    _assert_refused(bad, out, r"a llama with 4 layers, the base is a qwen2 with 4", CheckpointError)
    with safe_open(image_file, "pt") as fh:
        shrunk = {k: fh.get_tensor(k)[:, :16].contiguous() if "down_proj" in k else fh.get_tensor(k) for k in fh.keys()}
    save_file(shrunk, str(image_file))
    _assert_refused(spec, out, r"layer 0 FFN down has shape \(32, 16\), the base has \(32, 64\)", CheckpointError)
    _assert_refused(
        spec.model_copy(update={"layers": [7]}), out, r"layer\(s\) \[7\] do not exist: .*valid range 0..3\)"
    )


def test_lora_for_another_base_and_pickles(tmp_path):
    paths = write_tiny_checkpoint(tmp_path / "src", "llama", [])
    other = tiny_model("llama")
    other.config.intermediate_size = 48
    wide = AutoModelForCausalLM.from_config(other.config)
    peft.get_peft_model(wide, peft.LoraConfig(r=2, target_modules=["down_proj"])).save_pretrained(tmp_path / "lora")
    spec = moekit.UpcycleSpec(
        base=str(paths["base"]),
        layers=[0],
        top_k=1,
        experts=[{"name": "l", "source": str(tmp_path / "lora")}, {"name": "base"}],
    )
    _assert_refused(
        spec,
        tmp_path / "moe",
        r"LoRA model.layers.0.mlp.down_proj maps 48 -> 32 features but the base layer is 64 -> 32",
        CheckpointError,
    )
    state = _dense("llama", paths["base"]).state_dict()
    torch.save({k: v for k, v in state.items() if ".mlp." in k}, tmp_path / "pickled.bin")
    (tmp_path / "pick").mkdir()
    (tmp_path / "pickled.bin").rename(tmp_path / "pick" / "pytorch_model.bin")
    spec = spec.model_copy(
        update={"experts": [spec.experts[0].model_copy(update={"source": str(tmp_path / "pick")}), spec.experts[1]]}
    )
    _assert_refused(
        spec,
        tmp_path / "moe",
        r"pytorch_model.bin: a pickle checkpoint; moekit reads only safetensors",
        CheckpointError,
    )
    convert(spec, tmp_path / "moe", progress=False, allow_pickle=True)
    assert moekit.load(tmp_path / "moe").model.layers[0].mlp.experts.down_proj.shape == (2, 32, 64)


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    paths = write_tiny_checkpoint(tmp_path / "src", "qwen3", ["image", "video"])
    out = tmp_path / "moe"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="exists and is not empty; pass --overwrite"):
        convert(_spec(paths), out, progress=False)
    assert (out / "precious.txt").read_text() == "keep me"
    convert(_spec(paths), out, progress=False, overwrite=True)
    assert not (out / "precious.txt").exists() and (out / "config.json").is_file()


@pytest.mark.parametrize("failure", ["disk_full", "interrupt"])
def test_failed_or_interrupted_writes_leave_nothing(tmp_path, monkeypatch, failure):
    paths = write_tiny_checkpoint(tmp_path / "src", "qwen3", ["image", "video"])
    calls = {"n": 0}
    import moekit.io.writer as writer

    original = writer._header

    def failing_header(shard, metadata):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device") if failure == "disk_full" else KeyboardInterrupt()
        return original(shard, metadata)

    monkeypatch.setattr(writer, "_header", failing_header)
    error = KeyboardInterrupt if failure == "interrupt" else OSError
    match = "disk full while writing model-00002" if failure == "disk_full" else None
    _assert_refused(_spec(paths), tmp_path / "moe", match, error, max_shard_bytes=60_000)


def test_cli_with_yaml_flags_and_overrides(tmp_path):
    paths = write_tiny_checkpoint(tmp_path / "src", "qwen2_5_vl", ["image", "video"])
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(
        yaml.safe_dump(
            {
                "base": str(paths["base"]),
                "layers": "full",
                "top_k": 1,
                "experts": [{"name": "image", "source": str(paths["image"])}, {"name": "base"}],
            }
        )
    )
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "upcycle",
            str(spec_file),
            "--set",
            "layers=interval:2:1",
            "--set",
            "router.std=0.1",
            "-o",
            str(tmp_path / "a"),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert moekit.load(tmp_path / "a").config.moekit["layers"] == [1, 3]
    result = runner.invoke(
        app,
        [
            "upcycle",
            "--base",
            str(paths["base"]),
            "--expert",
            f"image={paths['image']},noise_scale=0.01",
            "--expert",
            f"video={paths['video']},seed=3",
            "--expert",
            "base",
            "--layers",
            "interval:2",
            "--top-k",
            "2",
            "-o",
            str(tmp_path / "b"),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    meta = moekit.load(tmp_path / "b").config.moekit
    assert meta["experts"] == ["image", "video", "base"] and meta["spec"]["experts"][0]["noise_scale"] == 0.01
    result = runner.invoke(
        app,
        [
            "upcycle",
            "--base",
            str(paths["base"]),
            "--expert",
            "image=/nowhere",
            "--expert",
            "base",
            "-o",
            str(tmp_path / "c"),
        ],
    )
    assert result.exit_code == 1 and "error: expert 'image': source '/nowhere' does not exist" in result.output
    assert not (tmp_path / "c").exists()
    result = runner.invoke(app, ["upcycle", str(spec_file), "--set", "top_k=7", "-o", str(tmp_path / "d")])
    assert result.exit_code == 1 and "top_k=7 is larger than num_experts=2" in result.output


def test_moekit_upcycle_help_documents_the_command():
    result = CliRunner().invoke(app, ["upcycle", "--help"])
    assert result.exit_code == 0
    for flag in ("--base", "--expert", "--layers", "--top-k", "--overwrite", "--quiet", "--set", "--allow-pickle"):
        assert flag in result.output


@pytest.mark.parametrize("transposed", [False, True])
def test_joined_gate_up_goes_into_one_kept_buffer_with_the_same_values(transposed):
    """A streaming conversion joins gate|up per expert and layer into the buffer `kept_buffer` holds for it."""
    from moekit.arch.adapter import FfnLayout, fused_shapes
    from moekit.upcycle.checkpoint_sources import kept_buffer

    layout = FfnLayout("gated", gate="gate_proj", up="up_proj", down="down_proj", transposed=transposed)

    def joined(gate, up, down, scratch=None):
        out = None
        if scratch is not None:
            shape = fused_shapes(layout, {"up": [tuple(gate.shape), tuple(up.shape)]})["up"]
            out = kept_buffer(scratch, "up", shape, gate.dtype)
        return layout.fuse([gate, up], [None, None], down, None, out)

    torch.manual_seed(0)
    layers = [[torch.randn(6, 4), torch.randn(6, 4), torch.randn(5, 6)] for _ in range(3)]
    scratch = {}
    ptrs = []
    for gate, up, down in layers:
        expected = joined(gate, up, down)
        got = joined(gate, up, down, scratch)
        assert torch.equal(got["up"], expected["up"]) and torch.equal(got["down"], expected["down"])
        assert got["up"].data_ptr() != gate.data_ptr()
        ptrs.append(got["up"].data_ptr())
    assert len(set(ptrs)) == 1 and scratch["up"].data_ptr() == ptrs[0]
    wider = joined(torch.randn(8, 4), torch.randn(8, 4), torch.randn(5, 8), scratch)
    assert wider["up"].shape == ((8, 8) if transposed else (16, 4))  # remade to fit, and kept
    assert scratch["up"].data_ptr() == wider["up"].data_ptr()
    gate, up, down = layers[0]
    assert joined(gate, up, down)["up"].data_ptr() != scratch["up"].data_ptr()
    assert kept_buffer(scratch, "up", (16, 4) if not transposed else (8, 8), torch.bfloat16).dtype == torch.bfloat16
