"""Two CPU processes (gloo) under torchrun give the losses of one process with the same global batch.

One launch runs a DDP stage and an FSDP2 stage (an upcycled MoE, checkpointed while sharded); the same recipe
then runs in this process with the whole global batch. A second launch crashes a sharded run and resumes it.
DeepSpeed ZeRO-2/3 tests need the `deepspeed` extra and compile its ops on first use, so they are marked slow.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import moekit

from .recipes import losses, run, stage, write_recipe

pytestmark = pytest.mark.distributed

# top-2 of 2 experts: with top-k < M a near-tie in the router may flip between runs and send a gradient elsewhere.
EXPERTS = [{"name": "image", "source": {"stage": "specialist"}}, {"name": "base"}]
MOE = {"upcycle": {"base": {"stage": "dense"}, "layers": "interval:2", "top_k": 2, "experts": EXPERTS}}


def torchrun(*args: str, script: str | None = None, processes: int = 2) -> None:
    """Launch `moekit ARGS` (or `python SCRIPT ARGS`) on `processes` CPU processes."""
    program = script or str(Path(sys.executable).parent / "moekit")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    result = subprocess.run([*command, program, *args], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def assert_same_weights(left, right) -> None:
    for (name, a), b in zip(left.named_parameters(), right.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def compare_runs(left: Path, right: Path, stages: list[str]) -> None:
    for name in stages:
        for key in ("loss", "loss/ce", "grad_norm"):
            tolerance = 1e-4 if key == "grad_norm" else 1e-5
            assert losses(left / name, key) == pytest.approx(losses(right / name, key), rel=tolerance), (name, key)


def test_ddp_and_fsdp2_on_two_processes_match_one_process(tmp_path, tiny_base):
    data = {"kinds": ["text", "image"], "num_samples": 8}  # the two processes see different modalities
    # Adam's first step is lr * sign(g): float noise on a near-zero gradient would flip whole steps. A large eps
    # makes small gradients move weights in proportion, so equal gradients give visibly equal weights.
    adam = {"lr": 1e-2, "eps": 1e-3}
    stages = [
        stage(
            "dense",
            trainable=["projector", "ffn"],
            steps=2,
            optimizer=adam,
            data_params=data,
            distributed={"mode": "ddp"},
        ),
        stage(
            "specialist",
            **{"from": {"stage": "dense"}},
            trainable=["ffn"],
            save="ffn_only",
            gradient_checkpointing=True,
            optimizer=adam,
            data_params=data,
            distributed={"mode": "fsdp2"},
        ),
        stage(
            "moe",
            **{"from": MOE},
            trainable=["router", "experts", "projector"],
            steps=2,
            grad_accum=2,
            save_every=1,
            losses={"load_balancing": 0.0},  # the balance loss is not additive over micro-batches
            optimizer=adam,
            data_params=data,
            distributed={"mode": "fsdp2"},
        ),
    ]
    recipe = write_recipe(tmp_path, tiny_base, stages, out="two")
    torchrun("run", str(recipe))
    single = ["output_dir=" + str(tmp_path / "one")]
    single += [f"stages[{i}].{key}" for i in (0, 1, 2) for key in ("batch_size=2", "distributed.mode=single")]
    run(recipe, *single)
    compare_runs(tmp_path / "two", tmp_path / "one", ["dense", "specialist", "moe"])
    ffn = [
        json.loads((tmp_path / d / "specialist" / "model" / "moekit.json").read_text())["keys"] for d in ("two", "one")
    ]
    assert ffn[0] == ffn[1] and len(ffn[0]) == 12
    assert_same_weights(*(moekit.load(tmp_path / d / "moe" / "model") for d in ("two", "one")))
    checkpoint = tmp_path / "two" / "moe" / "checkpoints" / "step-00000002"
    assert {p.name for p in checkpoint.iterdir()} >= {"state", "trainer.pt", "trainer_state.json"}


def test_ddp_with_a_learned_position_encoder_that_one_process_never_uses(tmp_path, tiny_base):
    """Process 0 gets text, process 1 a video: only one uses the temporal table, yet DDP neither hangs nor drifts
    (the trainer touches every trainable parameter) and the result equals one process with the whole batch."""
    data = {"kinds": ["text", "video"], "num_samples": 8}
    encoders = [{"name": "temporal_frame", "params": {"mode": "learned", "init": "normal", "max_frames": 4}}]
    spec = stage(
        "pe",
        trainable=["position_encoders", "projector"],
        position_encoders=encoders,
        steps=2,
        optimizer={"lr": 1e-2, "eps": 1e-3},
        data_params=data,
        distributed={"mode": "ddp"},
    )
    recipe = write_recipe(tmp_path, tiny_base, [spec], out="two")
    torchrun("run", str(recipe))
    run(recipe, "output_dir=" + str(tmp_path / "one"), "stages[0].batch_size=2", "stages[0].distributed.mode=single")
    compare_runs(tmp_path / "two", tmp_path / "one", ["pe"])
    tables = [
        load_file(str(tmp_path / d / "pe" / "model" / "position_encoders.safetensors"))["temporal_frame.table.weight"]
        for d in ("two", "one")
    ]
    torch.testing.assert_close(tables[0], tables[1], atol=1e-5, rtol=1e-4)
    frozen = ["output_dir=" + str(tmp_path / "frozen"), "stages[0].trainable=[projector]"]
    run(recipe, *frozen, "stages[0].batch_size=2", "stages[0].distributed.mode=single")
    start = load_file(str(tmp_path / "frozen" / "pe" / "model" / "position_encoders.safetensors"))
    moved = (tables[0] - start["temporal_frame.table.weight"]).abs().amax(-1)
    assert moved[0] > 1e-4 and (moved[2:] == 0).all()  # the video's frame rows trained, the unused ones did not


needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("zero", [2, 3])
def test_deepspeed_zero_on_two_processes_matches_one_process(tmp_path, tiny_base, zero):
    data = {"kinds": ["image"], "num_samples": 8}  # ZeRO-3 needs every process to run the vision tower
    spec = stage(
        "dense",
        trainable=["projector", "ffn"],
        steps=2,
        grad_accum=2,
        save_every=1,
        data_params=data,
        optimizer={"lr": 1e-2, "eps": 1e-3},
        distributed={"mode": "deepspeed", "zero_stage": zero},
    )
    recipe = write_recipe(tmp_path, tiny_base, [spec], out="two")
    torchrun("run", str(recipe))
    run(recipe, "output_dir=" + str(tmp_path / "one"), "stages[0].batch_size=2", "stages[0].distributed.mode=single")
    compare_runs(tmp_path / "two", tmp_path / "one", ["dense"])
    from moekit.train.outputs import load_model

    assert_same_weights(*(load_model(tmp_path / d / "dense" / "model", where="t") for d in ("two", "one")))


@pytest.mark.parametrize("mode", ["fsdp2", pytest.param("deepspeed", marks=[needs_deepspeed, pytest.mark.slow])])
def test_sharded_resume_reproduces_an_uninterrupted_run(tmp_path, tiny_base, mode):
    spec = stage(
        "moe",
        **{"from": {"upcycle": {"layers": "interval:2", "num_experts": 2, "top_k": 2}}},
        trainable=["router", "experts"],
        steps=4,
        grad_accum=2,
        save_every=1,
        schedule={"kind": "cosine", "warmup_ratio": 0.25},
        data_params={"kinds": ["image"], "num_samples": 8},
        distributed={"mode": mode},
    )
    recipe = write_recipe(tmp_path, tiny_base, [spec])
    worker = str(Path(__file__).with_name("resume_worker.py"))
    torchrun(str(recipe), str(tmp_path), "4", script=worker)  # the second run crashes while collecting step 3
    straight, resumed = tmp_path / "straight" / "moe", tmp_path / "resumed" / "moe"
    for key in ("loss", "grad_norm", "lr"):
        assert losses(resumed, key) == pytest.approx(losses(straight, key), rel=1e-6), key
    events = [e["event"] for e in map(json.loads, (resumed / "logs" / "metrics.jsonl").open())]
    assert events.count("resume") == 1 and losses(resumed, "step") == [1, 2, 3, 4]
