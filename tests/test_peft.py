"""LoRA from peft on the router and the fused experts of an upcycled model: train, save, load."""

import peft
import torch

import moekit
from moekit.demo.tiny import tiny_inputs, tiny_model

from .conftest import logits

TARGETS = ["mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _moe():
    return moekit.upcycle(tiny_model("qwen2_5_vl"), moekit.UpcycleSpec(layers="interval:2", num_experts=3, top_k=2))


def test_lora_on_router_and_experts_trains_saves_and_loads(tmp_path):
    model = peft.get_peft_model(
        _moe(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=[], target_parameters=TARGETS)
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for layer in (0, 2):
        for target in TARGETS:
            assert any(f"layers.{layer}.{target.rsplit('.', 1)[0]}" in n and "lora_" in n for n in trainable), target
    assert not any("lora" not in n for n in trainable)
    batch = tiny_inputs("qwen2_5_vl", "image")
    batch["labels"] = batch["input_ids"].clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    losses = []
    for _ in range(8):
        out = model(**batch)
        loss = out.loss + 0.01 * moekit.router_losses(model).load_balancing
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.05
    model.eval()
    expected = logits(model, batch)
    model.save_pretrained(tmp_path / "lora")
    restored = peft.PeftModel.from_pretrained(_moe(), tmp_path / "lora").eval()
    torch.testing.assert_close(logits(restored, batch), expected, atol=1e-6, rtol=0)
    merged = restored.merge_and_unload()
    torch.testing.assert_close(logits(merged, batch), expected, atol=1e-5, rtol=0)
