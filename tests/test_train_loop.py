"""The training loop on tiny models: accumulation, phases, resume, stage outputs and the stage chain."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import moekit
from moekit.arch import resolve_arch
from moekit.train.outputs import load_model

from .recipes import losses, run, stage, write_recipe
from .resume_worker import crash_after

UPCYCLE = {"upcycle": {"layers": "interval:2", "num_experts": 3, "top_k": 2}}


def weights(path):
    return load_file(str(path / "model.safetensors"))


def test_accumulating_two_micro_batches_equals_one_batch_of_two(tmp_path, tiny_base):
    common = dict(trainable=["projector", "ffn"], steps=2, schedule={"kind": "cosine", "warmup_ratio": 0.5})
    path = write_recipe(tmp_path, tiny_base, [stage("s", batch_size=2, **common)])
    run(path)
    accum = ["stages[0].batch_size=1", "stages[0].grad_accum=2", "stages[0].gradient_checkpointing=true"]
    run(path, "output_dir=" + str(tmp_path / "accum"), *accum)
    assert losses(tmp_path / "accum" / "s") == pytest.approx(losses(tmp_path / "runs" / "s"), rel=1e-5)
    a, b = weights(tmp_path / "runs" / "s" / "model"), weights(tmp_path / "accum" / "s" / "model")
    base = weights(tiny_base)
    changed = [k for k in a if not torch.equal(a[k], base[k])]
    assert changed and all(".mlp." in k or "merger" in k for k in changed)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_phases_switch_groups_and_frozen_groups_stop_moving(tmp_path, tiny_base):
    phases = [{"name": "router", "steps": 1, "trainable": ["router"]}, {"name": "proj", "trainable": ["projector"]}]
    path = write_recipe(
        tmp_path,
        tiny_base,
        [
            stage("phased", **{"from": UPCYCLE}, phases=phases, steps=2),
            stage("router_only", **{"from": UPCYCLE}, trainable=["router"], steps=1),
        ],
    )
    run(path)
    phased, single = (moekit.load(tmp_path / "runs" / n / "model") for n in ("phased", "router_only"))
    start = moekit.upcycle(load_model(tiny_base, where="t"), moekit.UpcycleSpec(**UPCYCLE["upcycle"]))
    p, s, b = (dict(m.named_parameters()) for m in (phased, single, start))
    for name in b:
        if ".mlp.gate." in name:  # trained in phase 1 only: equal to one step of router training
            assert not torch.equal(p[name], b[name])
            torch.testing.assert_close(p[name], s[name], atol=0, rtol=0)
        elif "visual.merger" in name:
            assert not torch.equal(p[name], b[name]) and torch.equal(s[name], b[name])
        else:
            assert torch.equal(p[name], b[name]), name
    events = [json.loads(line) for line in (tmp_path / "runs" / "phased" / "logs" / "metrics.jsonl").open()]
    assert [(e["step"], e["phase"]) for e in events if e["event"] == "phase"] == [(0, "router"), (1, "proj")]


def test_resume_reproduces_the_losses_of_an_uninterrupted_run(tmp_path, tiny_base):
    phases = [
        {"name": "router", "steps": 2, "trainable": ["router"]},
        {"name": "all", "trainable": ["experts", "router", "projector"]},
    ]
    spec = stage(
        "moe",
        **{"from": UPCYCLE},
        phases=phases,
        steps=4,
        grad_accum=2,
        save_every=2,
        keep_checkpoints=1,
        schedule={"kind": "cosine", "warmup_ratio": 0.2},
        losses={"load_balancing": 0.1, "z_loss": 0.01},
        data_params={"kinds": ["image", "text"], "num_samples": 6},  # 3 steps per epoch: the run crosses an epoch
    )
    straight = write_recipe(tmp_path, tiny_base, [spec], name="straight.yaml", out="straight")
    run(straight, "stages[0].save_every=")
    crashed = write_recipe(tmp_path, tiny_base, [spec], name="crashed.yaml", out="crashed")
    with pytest.raises(KeyboardInterrupt):
        run(crashed, batch_source=crash_after(5))  # dies while collecting step 3, after checkpoint 2
    stage_dir = tmp_path / "crashed" / "moe"
    assert sorted(p.name for p in (stage_dir / "checkpoints").iterdir()) == ["step-00000002"]
    with pytest.raises(ValueError, match="holds an interrupted run; pass --resume"):
        run(crashed)
    run(crashed, resume=True)
    for key in ("loss", "loss/ce", "loss/load_balancing", "lr"):
        assert losses(stage_dir, key) == pytest.approx(losses(tmp_path / "straight" / "moe", key), rel=1e-6), key
    assert [r for r in losses(stage_dir, "step")] == [1, 2, 3, 4]
    a, b = moekit.load(stage_dir / "model"), moekit.load(tmp_path / "straight" / "moe" / "model")
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5, msg=name)
    assert run(crashed, resume=True) == [stage_dir / "model"]  # finished stages are skipped


def test_ffn_only_specialist_feeds_an_upcycle_stage(tmp_path, tiny_base):
    path = write_recipe(
        tmp_path,
        tiny_base,
        [
            stage("align", trainable=["projector"]),
            stage("image", **{"from": {"stage": "align"}}, trainable=["ffn"], save="ffn_only", steps=2),
            stage(
                "moe",
                **{
                    "from": {
                        "upcycle": {
                            "base": {"stage": "align"},
                            "layers": "interval:2",
                            "top_k": 2,
                            "experts": [{"name": "image", "source": {"stage": "image"}}, {"name": "base"}],
                            "router": {"init": "prototype"},  # calibrated on the stage's own batches
                            "calibration_batches": 2,
                        }
                    }
                },
                trainable=["router"],
            ),
        ],
    )
    run(path)
    runs = tmp_path / "runs"
    specialist = runs / "image" / "model"
    with safe_open(str(specialist / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    dense = load_model(runs / "align" / "model", where="t")
    full = tmp_path / "dense_full"
    dense.save_pretrained(full)
    with safe_open(str(full / "model.safetensors"), "pt") as fh:
        expected = {k for k in fh.keys() if ".mlp." in k and "visual" not in k}  # noqa: SIM118
    assert keys == expected and len(keys) == 4 * 3
    meta = json.loads((specialist / "moekit.json").read_text())
    assert meta["format"] == "ffn_only" and meta["stage"] == "image" and sorted(meta["keys"]) == sorted(keys)
    assert "recipe.yaml" in {p.name for p in specialist.iterdir()}
    with pytest.raises(ValueError, match="ffn_only output"):
        load_model(specialist, where="t")

    ffn = load_file(str(specialist / "model.safetensors"))
    assert not torch.equal(
        ffn["model.layers.0.mlp.up_proj.weight"], dense.state_dict()["model.language_model.layers.0.mlp.up_proj.weight"]
    )
    moe = moekit.load(runs / "moe" / "model")
    assert moe.config.moekit["experts"] == ["image", "base"]
    experts = resolve_arch(moe).ffn_module(moe, 2).experts
    fused = torch.cat([ffn["model.layers.2.mlp.gate_proj.weight"], ffn["model.layers.2.mlp.up_proj.weight"]])
    torch.testing.assert_close(experts.gate_up_proj[0], fused)  # the router trained, the experts did not
    torch.testing.assert_close(experts.down_proj[1], dense.model.language_model.layers[2].mlp.down_proj.weight)
    assert moe.config.moekit["spec"]["experts"][0]["source"] == str(specialist)


def test_epochs_count_steps_from_the_source_length(tmp_path, tiny_base):
    spec = stage("s", trainable=["ffn"], steps=None, epochs=1.5, grad_accum=2, data_params={"num_samples": 4})
    run(write_recipe(tmp_path, tiny_base, [spec]))  # 4 samples / (1 x 2) = 2 steps per epoch
    assert losses(tmp_path / "runs" / "s", "step") == [1, 2, 3]


def test_lora_stage_saves_merged_weights_or_the_adapter(tmp_path, tiny_base):
    lora = {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}
    path = write_recipe(
        tmp_path,
        tiny_base,
        [
            stage("merged", trainable=["lora"], lora=lora, steps=2, data_params={"kinds": ["text"]}),
            stage("adapter", trainable=["lora"], lora=lora, save="lora_adapter", data_params={"kinds": ["text"]}),
        ],
    )
    run(path)
    merged, base = weights(tmp_path / "runs" / "merged" / "model"), weights(tiny_base)
    assert set(merged) == set(base)
    changed = {k for k in base if not torch.equal(merged[k], base[k])}
    assert changed and all(("q_proj" in k or "v_proj" in k) and k.endswith("weight") for k in changed)
    adapter = tmp_path / "runs" / "adapter" / "model"
    assert {"adapter_config.json", "adapter_model.safetensors", "moekit.json"} <= {p.name for p in adapter.iterdir()}
    assert json.loads((adapter / "moekit.json").read_text())["format"] == "lora_adapter"


def test_bf16_autocast_trains_close_to_fp32(tmp_path, tiny_base):
    path = write_recipe(tmp_path, tiny_base, [stage("s", trainable=["ffn"], steps=2, data_params={"kinds": ["text"]})])
    run(path)
    run(path, "output_dir=" + str(tmp_path / "bf16"), "stages[0].precision=bf16")
    assert losses(tmp_path / "bf16" / "s") == pytest.approx(losses(tmp_path / "runs" / "s"), rel=2e-2)
    assert losses(tmp_path / "bf16" / "s") != losses(tmp_path / "runs" / "s")  # autocast really ran in bf16
    assert all(v.dtype == torch.float32 for v in weights(tmp_path / "bf16" / "s" / "model").values())
