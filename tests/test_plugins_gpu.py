"""The built-in encoders and heads on a CUDA device in bf16 (skipped where there is no GPU)."""

import pytest
import torch

import moekit.plugins.registry as registry
from moekit.demo.tiny import VIDEO_ID, tiny_inputs, tiny_model
from moekit_plugins.position import CameraGeometry

from .test_position_geometry import K, pose
from .test_synergy_heads import tokenizer, with_synergy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_position_encoders_and_synergy_head_on_cuda_bf16():
    model = tiny_model("qwen2_5_vl").to("cuda", torch.bfloat16)
    reg = registry.registry()
    polyv = reg.build("position_encoder", "polyv_3d", {}, model=model)
    temporal = reg.build("position_encoder", "temporal_frame", {"mode": "learned", "init": "normal"}, model=model)
    assert temporal.table.weight.device.type == "cuda"
    head = reg.build("synergy_head", "polyv_synergy", {"num_tokens": 2, "temporal_dim": 6})
    ids = head.prepare(model, tokenizer())
    batch = with_synergy(tiny_inputs("qwen2_5_vl", "video"), ids)
    batch["mm_token_type_ids"] = (batch["input_ids"] == VIDEO_ID).long() * 2
    batch = {k: v.to("cuda") for k, v in batch.items()}
    batch["pixel_values_videos"] = batch["pixel_values_videos"].to(torch.bfloat16)
    scene = CameraGeometry(torch.full((4, 56, 56), 2.0), K, pose().float())
    with polyv.inputs(videos=[scene]):
        out = model(**batch, output_hidden_states=True)
    losses = head(
        hidden_states=out.hidden_states, input_ids=batch["input_ids"], teacher={"temporal": torch.randn(1, 4, 6)}
    )
    losses["synergy_temporal"].backward()
    assert torch.isfinite(losses["synergy_temporal"]) and temporal.table.weight.grad is not None
    rope = reg.build("position_encoder", "neo_native_rope", {"head_dim_t": 8, "head_dim_h": 4, "head_dim_w": 4})
    units = torch.tensor([[0, 1, 1, 0]], device="cuda")
    cos, sin = rope.cos_sin(rope.index(units, [[(1, 2)]]))
    assert cos.device.type == "cuda" and rope.mask(units).device.type == "cuda"


def test_cta_head_attached_on_cpu_follows_the_model_to_cuda():
    """`open_model_dir` attaches the head on the CPU; a later `model.to("cuda")` must not leave it behind."""
    from moekit.demo.tiny import tiny_inputs as inputs

    torch.manual_seed(0)
    model = tiny_model("qwen2_5_vl")
    head = registry.registry().build(
        "synergy_head", "vidllm_cta", {"num_bridge": 3, "width": 8, "heads": 1, "layer": 1}
    )
    head.prepare(model)
    with torch.no_grad():
        head.to_llm.weight.normal_()  # a trained feed-back: the head changes the logits
    batch = inputs("qwen2_5_vl", "image", seed=3)
    with torch.no_grad():
        on_cpu = model(**batch).logits
        model.to("cuda")
        on_cuda = model(**{k: v.to("cuda") for k, v in batch.items()}).logits
    assert head.bridge.device.type == "cuda"
    torch.testing.assert_close(on_cuda.cpu(), on_cpu, rtol=2e-2, atol=2e-2)  # cuDNN convolutions may use TF32
