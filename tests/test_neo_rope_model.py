"""NEO-ov native RoPE wired into Qwen2-VL, Qwen2.5-VL and Qwen3-VL: the mask and rotations the model really uses against eq. 2-4 and 7
worked by hand, a recipe stage that trains with it, and its save/load round trip."""

import json
import math

import pytest
import torch
import transformers
from safetensors.torch import load_file

import moekit
import moekit.plugins.registry as registry
from moekit.attach.position import build_encoders, feeding, load_encoders
from moekit.data.collate import Collator, split_batch
from moekit.data.preprocess import Preprocessor
from moekit.demo.tiny import IMAGE_ID, VIDEO_ID, VISION_END_ID, VISION_START_ID, tiny_inputs, tiny_model
from moekit.evaluate.generate import Sampling, generate_ids, make_request
from moekit.evaluate.model_dir import open_model_dir
from moekit.train.outputs import load_model
from moekit_plugins.position.neo_attention import FAMILIES, visual_units

from .recipes import losses, run, write_recipe

NEO = {"name": "neo_native_rope", "params": {"head_dim_h": 8, "head_dim_w": 8}}


def neo(model, **params):
    return registry.registry().build("position_encoder", "neo_native_rope", params, model=model)


def rotate_by_hand(x, position, theta):
    """RoPE of one head vector: channel pairs (k, k + d/2) turned by position * theta^(-2k/d)."""
    d = x.numel()
    out = x.clone()
    for k in range(d // 2):
        angle = position * theta ** (-2 * k / d)
        a, b = float(x[k]), float(x[k + d // 2])
        out[k] = a * math.cos(angle) - b * math.sin(angle)
        out[k + d // 2] = b * math.cos(angle) + a * math.sin(angle)
    return out


@pytest.fixture(params=FAMILIES)
def captured(request):
    """A tiny model of each family with NEO attached (random H/W keys) and, for one forward on [text, an image of
    2x2 units, text], what layer 0 got: its hidden states and the query, key and mask passed to the attention kernel."""
    torch.manual_seed(0)
    model = tiny_model(request.param).eval()
    encoder = neo(model, head_dim_h=4, head_dim_w=4)
    for k in encoder.k_hw:
        torch.nn.init.normal_(k.weight, std=0.5)
    seen = {}
    inner = encoder.inner_attention

    def spy(module, query, key, value, mask, **kwargs):
        if module.layer_idx == 0:
            seen.update(query=query, key=key, mask=mask)
        return inner(module, query, key, value, mask, **kwargs)

    encoder.inner_attention = spy
    attention = model.model.language_model.layers[0].self_attn
    hook = attention.register_forward_pre_hook(
        lambda m, a, kw: seen.update(hidden=kw["hidden_states"]), with_kwargs=True
    )
    batch = tiny_inputs(request.param, "image", text_len=4)
    with torch.no_grad():
        model(**batch)
    hook.remove()
    yield model, encoder, batch, seen
    encoder.remove()


def test_the_model_attends_with_the_mixed_mask_of_eq_7(captured):
    _, _, batch, seen = captured
    # text, text, <vision_start>, 4 image tokens (one 2x2 unit), <vision_end>, text, text
    assert batch["input_ids"].shape[1] == 10
    u = [0, 0, 0, 1, 1, 1, 1, 0, 0, 0]
    expected = [[int(j <= i or u[i] == u[j] > 0) for j in range(10)] for i in range(10)]
    assert expected[3] == [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]  # the first image token sees the whole image
    assert expected[2][3] == 0 and expected[7][6] == 1  # text before the image does not, text after does
    assert seen["mask"].shape == (1, 1, 10, 10) and seen["mask"].dtype == torch.bool
    assert seen["mask"][0, 0].int().tolist() == expected


def test_queries_and_keys_are_rotated_as_eq_2_4_say(captured):
    model, encoder, _, seen = captured
    attention = model.model.language_model.layers[0].self_attn
    hidden = seen["hidden"][0].detach()
    t = [0, 1, 2, 3, 3, 3, 3, 4, 5, 6]  # t advances on text, is shared inside the image, and goes on after it
    h = [0, 0, 0, 0, 0, 1, 1, 0, 0, 0]
    w = [0, 0, 0, 0, 1, 0, 1, 0, 0, 0]
    theta_t = model.config.text_config.rope_parameters["rope_theta"]  # the T group is the LLM's own RoPE
    assert seen["query"].shape == (1, 4, 10, 8 + 4 + 4) and seen["key"].shape == (1, 2, 10, 16)
    for i in (1, 5, 6, 8):
        for kind, proj, hw, got in (
            ("q", attention.q_proj, encoder.q_hw[0], seen["query"]),
            ("k", attention.k_proj, encoder.k_hw[0], seen["key"]),
        ):
            raw_t = proj(hidden[i]).detach().view(-1, 8)  # [heads, head_dim]
            norm = getattr(attention, f"{kind}_norm", None)  # Qwen3-VL normalises each head before its RoPE
            raw_t = (raw_t if norm is None else norm(raw_t).detach())[0]  # head 0
            raw_hw = hw(hidden[i]).detach()[:8]  # the new H/W channels: no norm (see docs/fidelity.md)
            want = torch.cat(
                [
                    rotate_by_hand(raw_t, t[i], theta_t),
                    rotate_by_hand(raw_hw[:4], h[i], 1e4),
                    rotate_by_hand(raw_hw[4:], w[i], 1e4),
                ]
            )
            torch.testing.assert_close(got[0, 0, i], want, atol=1e-5, rtol=1e-5, msg=f"{kind} of token {i}")


def test_units_are_images_and_video_temporal_patches_in_sequence_order():
    # ids: 5 = image token, 6 = video token; a video of 2 temporal patches of 2x2 merged tokens, then an image
    # of 1x2; a 2x2 merge, so the grids are given in patches (t, 2H, 2W)
    ids = torch.tensor([[1, 6, 6, 6, 6, 6, 6, 6, 6, 1, 5, 5, 1], [1, 5, 5, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
    grids = {"image": torch.tensor([[1, 2, 4], [1, 2, 4]]), "video": torch.tensor([[2, 4, 4]])}
    units, unit_grids = visual_units(ids, {"image": 5, "video": 6}, grids, merge=2)
    assert units.tolist() == [[0, 1, 1, 1, 1, 2, 2, 2, 2, 0, 3, 3, 0], [0, 1, 1] + [0] * 10]
    assert unit_grids == [[(2, 2), (2, 2), (1, 2)], [(1, 2)]]
    with pytest.raises(ValueError, match="image_grid_thw lists 3 image"):
        visual_units(ids, {"image": 5, "video": 6}, {**grids, "image": torch.tensor([[1, 2, 4]] * 3)}, merge=2)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_video_is_one_unit_per_temporal_patch_in_each_family(family):
    """The model's own video tokens (Qwen3-VL wraps each temporal patch in its own start/end pair) give one unit
    per temporal patch of 2x2 merged tokens, each attended to both ways inside, causally across."""
    model = tiny_model(family).eval()
    encoder = neo(model, head_dim_h=4, head_dim_w=4)
    batch = tiny_inputs(family, "video")
    video = model.config.video_token_id
    units, grids = encoder.layout(batch["input_ids"], None, batch["video_grid_thw"])
    ids = batch["input_ids"][0]
    assert grids == [[(2, 2), (2, 2)]]  # grid (2, 4, 4) in patches, merge 2: two temporal patches of 2x2
    assert (units[0] > 0).tolist() == (ids == video).tolist()
    assert units[0][ids == video].tolist() == [1] * 4 + [2] * 4
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()
    allowed = encoder._state[2][0, 0]
    first, second = (ids == video).nonzero().flatten().view(2, 4)
    assert allowed[first[0], first[-1]] and allowed[second[0], second[-1]]  # bidirectional inside a unit
    assert allowed[second[0], first[-1]] and not allowed[first[0], second[-1]]  # causal across units


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "upcycled"])
def test_text_is_the_pretrained_model_until_the_keys_train(moe, family):
    model = tiny_model(family).eval()
    if moe:
        model = moekit.upcycle(model, moekit.UpcycleSpec(base="tiny", layers="full", num_experts=2, top_k=1)).eval()
    text, image = tiny_inputs(family, "text"), tiny_inputs(family, "image")
    with torch.no_grad():
        plain_text, plain_image = model(**text).logits, model(**image).logits
        encoder = neo(model, head_dim_h=4, head_dim_w=4)
        torch.testing.assert_close(model(**text).logits, plain_text, atol=1e-5, rtol=0)
        assert (model(**image).logits - plain_image).abs().max() > 1e-3  # the mask and the t index of the image
        encoder.remove()
        assert model.config.text_config._attn_implementation == "sdpa"
        torch.testing.assert_close(model(**image).logits, plain_image, atol=0, rtol=0)


def test_eager_attention_gets_the_same_mask_in_its_additive_form():
    image = tiny_inputs("qwen2_5_vl", "image")
    logits = []
    for implementation in ("sdpa", "eager"):
        model = tiny_model("qwen2_5_vl").eval()
        model.set_attn_implementation(implementation)
        torch.manual_seed(1)
        encoder = neo(model, head_dim_h=4, head_dim_w=4)
        for k in encoder.k_hw:
            torch.nn.init.normal_(k.weight, std=0.5)
        with torch.no_grad():
            logits.append(model(**image).logits)
        encoder.remove()
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=0)


def test_wrong_families_settings_and_foreign_caches_are_refused():
    with pytest.raises(
        ValueError,
        match=r"stages\[0\]\.position_encoders\[0\]: neo_native_rope is wired into qwen2_5_vl, qwen2_vl, qwen3_vl only.*'llava'",
    ):
        build_encoders([NEO], tiny_model("llava"), "stages[0].position_encoders")
    model = tiny_model("qwen2_5_vl").eval()
    with pytest.raises(ValueError, match=r"head_dim_t=128 but the model's is 8"):
        neo(model, head_dim_t=128)
    model.config.text_config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match=r"needs sdpa or eager attention.*'flash_attention_2'"):
        neo(model)
    model.config.text_config._attn_implementation = "sdpa"
    assert model.config.text_config._attn_implementation == "sdpa"  # a refused build leaves the model as it was
    encoder = neo(model, head_dim_h=4, head_dim_w=4)
    batch = tiny_inputs("qwen2_5_vl", "image")
    out = model.generate(**batch, max_new_tokens=3, do_sample=False, use_cache=False)
    assert out.tolist() == full_forward_decoding(model, batch, 3)[0].tolist()
    stray = transformers.DynamicCache()  # a cache the encoder did not see filled
    model(**batch, past_key_values=stray, use_cache=True)
    encoder._decoding = None
    with pytest.raises(ValueError, match="a KV cache this encoder did not fill from its prefill"):
        model(input_ids=batch["input_ids"][:, -1:], past_key_values=stray, use_cache=True)
    encoder.remove()


def full_forward_decoding(model, batch, steps):
    """Greedy decoding by a whole forward per new token (no cache): the ids, and each step's last logits."""
    ids, mask, scores = batch["input_ids"], batch["attention_mask"], []
    with torch.no_grad():
        for _ in range(steps):
            grown = ids.shape[1] - batch["input_ids"].shape[1]
            step = {**batch, "input_ids": ids, "attention_mask": torch.nn.functional.pad(mask, (0, grown), value=1)}
            step["mm_token_type_ids"] = torch.nn.functional.pad(batch["mm_token_type_ids"], (0, grown))
            scores.append(model(**step).logits[:, -1])
            ids = torch.cat([ids, scores[-1].argmax(-1, keepdim=True)], dim=1)
    return ids, scores


def left_padded_pair(family, kind):
    """Two samples of different lengths, the shorter left-padded (pad id 0, masked), as moekit's generate batches."""
    a, b = tiny_inputs(family, kind, seed=1, text_len=4), tiny_inputs(family, kind, seed=2, text_len=9)
    gap = b["input_ids"].shape[1] - a["input_ids"].shape[1]
    batch = {}
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        batch[key] = torch.cat([torch.nn.functional.pad(a[key], (gap, 0)), b[key]])
    for key in a.keys() - batch.keys():  # pixel values and grids: one after the other
        batch[key] = torch.cat([a[key], b[key]])
    return batch


@pytest.mark.parametrize("kind", ["image", "video"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_equals_a_whole_forward_per_token(family, kind):
    torch.manual_seed(0)
    model = tiny_model(family).eval()
    encoder = neo(model, head_dim_h=4, head_dim_w=4)
    for k in encoder.k_hw:  # trained H/W keys, so that their cache matters
        torch.nn.init.normal_(k.weight, std=0.5)
    batch = left_padded_pair(family, kind)
    steps = 5
    want, want_scores = full_forward_decoding(model, batch, steps)
    with feeding({"neo_native_rope": encoder}, model, batch["input_ids"], None):
        out = model.generate(
            **batch,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            use_cache=True,
            output_scores=True,
            return_dict_in_generate=True,
        )
        with torch.no_grad():  # a plain forward after it, in the same block, starts afresh
            after = model(**batch, use_cache=False).logits
    with torch.no_grad():
        torch.testing.assert_close(after, model(**batch, use_cache=False).logits, rtol=0, atol=0)
    assert out.sequences.tolist() == want.tolist()
    for got, expected in zip(out.scores, want_scores, strict=True):
        kept = torch.isfinite(got)  # min_new_tokens sets the end tokens' scores to -inf
        torch.testing.assert_close(got[kept], expected[kept], atol=1e-4, rtol=1e-4)
    bare = model.generate(**batch, max_new_tokens=steps, do_sample=False, use_cache=False)
    encoder.remove()
    assert model.generate(**batch, max_new_tokens=steps, do_sample=False).shape == bare.shape  # its own cache again


@pytest.mark.parametrize("family", FAMILIES)
def test_the_h_w_keys_follow_beam_search_and_assisted_decoding(family):
    """Beam search reorders the cache's rows each step and prompt-lookup decoding crops rejected tokens off its
    end: with the cache, both give what they give recomputing the sequence."""
    torch.manual_seed(0)
    model = tiny_model(family).eval()
    encoder = neo(model, head_dim_h=4, head_dim_w=4)
    for k in encoder.k_hw:
        torch.nn.init.normal_(k.weight, std=0.5)
    pair = left_padded_pair(family, "image")
    beams = dict(max_new_tokens=6, min_new_tokens=6, num_beams=3, do_sample=False, return_dict_in_generate=True)
    beams.update(output_scores=True, num_return_sequences=3)
    cached, recomputed = (model.generate(**pair, **beams, use_cache=use) for use in (True, False))
    assert cached.sequences.tolist() == recomputed.sequences.tolist()
    torch.testing.assert_close(cached.sequences_scores, recomputed.sequences_scores, atol=1e-5, rtol=1e-5)
    one = tiny_inputs(family, "image", seed=3)
    # the prompt's first two (text) tokens again at its end: the lookup proposes the text that followed them
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        one[key] = torch.cat([one[key], one[key][:, :2]], dim=1)
    visual = [[IMAGE_ID], [VIDEO_ID], [VISION_START_ID], [VISION_END_ID]]  # the tiny model could pick them
    greedy = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, bad_words_ids=visual)
    assisted = model.generate(**one, **greedy, prompt_lookup_num_tokens=3, use_cache=True)
    assert assisted.tolist() == model.generate(**one, **greedy, use_cache=False).tolist()
    encoder.remove()


def image_stage(name, synth_dir, **fields):
    out = {
        "name": name,
        "data": {"datasets": [{"name": "image", "path": str(synth_dir / "stage1_2_image.jsonl"), "modality": "image"}]},
        "optimizer": {"lr": 1e-2},
        "schedule": {"kind": "constant"},
        "trainable": ["projector", "position_encoders"],
        "batch_size": 2,
        "steps": 2,
    }
    out.update(fields)
    return out


@pytest.fixture(scope="module")
def neo_run(tmp_path_factory, bundle, synth_dir):
    tmp = tmp_path_factory.mktemp("neo")
    stages = [
        image_stage("neo", synth_dir, position_encoders=[NEO]),
        image_stage("plain", synth_dir, trainable=["projector"]),
        # lr 1e-30 (the schema wants lr > 0): `again` only loads, re-attaches and saves `neo`'s output
        image_stage(
            "again", synth_dir, steps=1, optimizer={"lr": 1e-30}, trainable=["projector"], **{"from": {"stage": "neo"}}
        ),
    ]
    run(write_recipe(tmp, bundle, stages))
    return tmp / "runs"


def test_a_recipe_stage_trains_with_it(neo_run):
    with_neo, plain = losses(neo_run / "neo"), losses(neo_run / "plain")
    # same seed, data and start: the image tokens' mask and t index differ, so the first loss does
    assert with_neo[0] != pytest.approx(plain[0], rel=1e-6, abs=0)  # a tiny random model: ~5e-5 apart
    record = json.loads((neo_run / "neo" / "model" / "moekit.json").read_text())
    assert record["position_encoders"] == [NEO]
    weights = load_file(str(neo_run / "neo" / "model" / "position_encoders.safetensors"))
    assert {k for k in weights if k.startswith("neo_native_rope.k_hw.")} == {
        f"neo_native_rope.k_hw.{i}.weight" for i in range(4)
    }
    assert weights["neo_native_rope.k_hw.0.weight"].abs().max() > 0  # the keys started at zero and trained
    assert not (neo_run / "plain" / "model" / "position_encoders.safetensors").exists()


def test_save_and_load_keep_it(neo_run, bundle, synth_dir):
    first, second = neo_run / "neo" / "model", neo_run / "again" / "model"
    assert json.loads((second / "moekit.json").read_text())["position_encoders"] == [NEO]  # inherited
    image = synth_dir / json.loads((synth_dir / "stage1_2_image.jsonl").read_text().splitlines()[0])["image"]
    request = make_request("What colour is the square?", images=[image])
    preprocessor = Preprocessor.from_dir(first)
    batch, _ = split_batch(
        Collator(preprocessor.pad_id)([preprocessor.encode_prompt(request.roles, request.texts, request.media, 0)])
    )
    logits = {}
    for name, folder in (("first", first), ("second", second)):
        model = load_model(folder, where="t").eval()
        encoders = load_encoders(folder, model)
        with torch.no_grad():
            logits[name] = model(**batch).logits
            for encoder in encoders.values():
                encoder.remove()
            logits[f"{name} bare"] = model(**batch).logits
            fresh = build_encoders([NEO], model, "t")  # the untrained encoder: zero H/W keys
            logits[f"{name} fresh"] = model(**batch).logits
            fresh["neo_native_rope"].remove()
    # `again` trained at lr 1e-30: loading `neo`'s output, re-attaching its encoder and saving again changes nothing
    torch.testing.assert_close(logits["second"], logits["first"], atol=1e-5, rtol=0)
    assert (logits["first"] - logits["first bare"]).abs().max() > 1e-3  # the re-attached encoder is at work
    assert (logits["first"] - logits["first fresh"]).abs().max() > 1e-3  # with its trained weights
    # generation from the saved folder runs with it (KV-cached) and is deterministic
    opened = open_model_dir(first)
    assert list(opened.encoders) == ["neo_native_rope"]
    greedy = Sampling(max_new_tokens=4)
    ids = generate_ids(opened, request, greedy)
    assert ids and ids == generate_ids(opened, request, greedy)
    assert opened.model.generation_config.use_cache  # generate decodes with the KV cache


def test_an_encoder_that_joins_no_model_is_refused_with_its_yaml_path(monkeypatch):
    """An index builder (what neo_native_rope builds without a model) cannot join a stage."""
    model = tiny_model("qwen2_5_vl")
    index_builder = registry.registry().build("position_encoder", "neo_native_rope", {})
    monkeypatch.setattr(type(registry.registry()), "build", lambda self, *args, **kwargs: index_builder)
    with pytest.raises(
        TypeError, match=r"stages\[1\]\.position_encoders\[0\]: position encoder 'neo_native_rope' does"
    ):
        build_encoders([NEO], model, "stages[1].position_encoders")


def test_gradient_checkpointing_gives_the_same_gradients():
    """Checkpointed layers run their attention again in backward; the H/W channels must be rebuilt the same."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = tiny_model("qwen2_5_vl")
        encoder = neo(model, head_dim_h=4, head_dim_w=4)
        for k in encoder.k_hw:
            torch.nn.init.normal_(k.weight, std=0.3)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model(**tiny_inputs("qwen2_5_vl", "image"), use_cache=False).logits.sum().backward()
        grads.append(encoder.q_hw[1].weight.grad)
        encoder.remove()
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=0)
