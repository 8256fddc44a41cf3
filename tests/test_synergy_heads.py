"""Synergy heads on a tiny Qwen2.5-VL: PolyV <synergy> tokens (embeddings, projectors, masked MSE) and the
Vid-LLM cross-task adapter (bridge attention, L_geo / L_lang / L_sc against hand-computed values)."""

import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import moekit.plugins.registry as registry
from moekit.config import ConfigError
from moekit.demo.tiny import IMAGE_ID, VOCAB, tiny_inputs, tiny_model
from moekit_plugins.synergy.cta import geometry_loss, language_loss, structure_loss
from moekit_plugins.synergy.polyv import GeometricProjector
from moekit_plugins.synergy.pooling import pool_tokens


def tokenizer(size: int = VOCAB) -> PreTrainedTokenizerFast:
    """An offline word-level tokenizer whose ids line up with the tiny models' vocabulary."""
    vocab = {f"w{i}": i for i in range(size)}
    vocab["<unk>"] = size - 1
    del vocab[f"w{size - 1}"]
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>")


def build(name, params):
    return registry.registry().build("synergy_head", name, params)


def with_synergy(batch, ids):
    """The batch with the synergy tokens inserted before the last text token."""
    extra = torch.tensor(ids)[None]
    input_ids = torch.cat([batch["input_ids"][:, :-1], extra, batch["input_ids"][:, -1:]], dim=1)
    out = dict(batch, input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    out["mm_token_type_ids"] = (input_ids == IMAGE_ID).long()
    return out


def test_hook_moekit_synergy_heads_builtin_polyv_prepare_adds_tokens_and_rows():
    model, tok = tiny_model("qwen2_5_vl"), tokenizer()
    old_in = model.get_input_embeddings().weight.detach().clone()
    head = build("polyv_synergy", {"num_tokens": 4, "temporal_dim": 6, "init_noise": 0.0})
    ids = head.prepare(model, tok)
    assert ids == [320, 321, 322, 323] and tok.convert_ids_to_tokens(ids) == head.tokens == [
        f"<synergy_{i}>" for i in range(4)
    ]
    assert tok("w5 " + head.text)["input_ids"] == [5, *ids]
    weight = model.get_input_embeddings().weight
    assert weight.shape == (324, 32) and torch.equal(weight[:320], old_in)
    torch.testing.assert_close(weight[320:], old_in.mean(0).expand(4, 32))
    assert model.get_output_embeddings().weight.shape == (324, 32)
    with torch.no_grad():
        weight[321] += 1.0
    trained = weight[321].clone()
    assert head.prepare(model, tok) == ids  # again (e.g. on resume): trained rows stay
    assert torch.equal(model.get_input_embeddings().weight[321], trained)


def test_a_head_must_be_prepared_first():
    head = build("polyv_synergy", {"temporal_dim": 4})
    with pytest.raises(RuntimeError, match=r"call head.prepare\(model, tokenizer\) first"):
        head(hidden_states=torch.zeros(1, 3, 32), input_ids=torch.zeros(1, 3, dtype=torch.long), teacher={})


def test_padded_vocabulary_rows_are_reused_not_shrunk():
    model, tok = tiny_model("qwen2_5_vl"), tokenizer(300)  # 300 tokenizer ids, 320 embedding rows
    before = model.get_input_embeddings().weight[:299].detach().clone()
    head = build("polyv_synergy", {"num_tokens": 2, "spatial_dim": 6, "init_noise": 0.5, "seed": 3})
    ids = head.prepare(model, tok)
    weight = model.get_input_embeddings().weight
    assert ids == [300, 301] and weight.shape == (320, 32)
    reference = weight[:300]
    assert torch.allclose(weight[ids].mean(0), reference.mean(0), atol=3 * 0.5 * float(reference.std().detach()))
    assert not torch.equal(weight[300], weight[301])  # noise makes the K tokens distinct
    assert torch.equal(weight[:299], before)


@pytest.fixture(scope="module")
def polyv():
    torch.manual_seed(0)
    model, tok = tiny_model("qwen2_5_vl"), tokenizer()
    head = build("polyv_synergy", {"num_tokens": 4, "temporal_dim": 6, "spatial_dim": 5})
    ids = head.prepare(model, tok)
    a = with_synergy(tiny_inputs("qwen2_5_vl", "image", seed=1), ids)
    b = with_synergy(tiny_inputs("qwen2_5_vl", "image", seed=2), ids)
    batch = {k: torch.cat([a[k], b[k]]) for k in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values")}
    batch["image_grid_thw"] = torch.cat([a["image_grid_thw"], b["image_grid_thw"]])
    return model, head, batch


def _forward(model, batch):
    return model(**batch, output_hidden_states=True).hidden_states


def test_polyv_losses_match_a_hand_computation(polyv):
    model, head, batch = polyv
    hidden = _forward(model, batch)
    generator = torch.Generator().manual_seed(0)
    temporal, spatial = torch.randn(2, 8, 6, generator=generator), torch.randn(2, 12, 5, generator=generator)
    teacher = {"temporal": temporal, "spatial": spatial, "temporal_mask": [True, False], "spatial_mask": [False, True]}
    losses = head(hidden_states=hidden, input_ids=batch["input_ids"], teacher=teacher)
    assert set(losses) == {"synergy_temporal", "synergy_spatial"} == set(head.loss_names)
    positions = [(batch["input_ids"][0] == i).nonzero().item() for i in head.token_ids]
    f_syn = hidden[-1][:, positions]  # [2, 4, 32]: the last layer's states at the K tokens
    pooled_t = temporal.reshape(2, 4, 2, 6).mean(2)  # 8 teacher tokens -> 4 chunks of 2
    pooled_s = spatial.reshape(2, 4, 3, 5).mean(2)
    expected_t = ((head.projectors["temporal"](f_syn[0]) - pooled_t[0]) ** 2).mean()
    expected_s = ((head.projectors["spatial"](f_syn[1]) - pooled_s[1]) ** 2).mean()
    torch.testing.assert_close(losses["synergy_temporal"], expected_t)
    torch.testing.assert_close(losses["synergy_spatial"], expected_s)
    (losses["synergy_temporal"] + losses["synergy_spatial"]).backward()
    grad = model.get_input_embeddings().weight.grad
    assert grad[head.token_ids].abs().sum() > 0
    assert all(p.grad is not None for p in head.parameters())
    model.zero_grad(set_to_none=True)
    head.zero_grad(set_to_none=True)


def test_polyv_paths_are_optional_per_sample(polyv):
    model, head, batch = polyv
    hidden = _forward(model, batch)
    ids = batch["input_ids"]
    temporal = torch.randn(2, 8, 6)
    only_first = head(hidden_states=hidden, input_ids=ids, teacher={"temporal": temporal, "temporal_mask": [1, 0]})
    first_alone = head(hidden_states=hidden[-1][:1], input_ids=ids[:1], teacher={"temporal": temporal[:1]})
    torch.testing.assert_close(only_first["synergy_temporal"], first_alone["synergy_temporal"])
    assert only_first["synergy_spatial"] == 0 and only_first["synergy_spatial"].requires_grad
    nothing = head(hidden_states=hidden, input_ids=ids, teacher={"temporal": None, "spatial": None})
    assert nothing["synergy_temporal"].item() == 0 == nothing["synergy_spatial"].item()
    # a sample without <synergy> tokens may come along when it carries no teacher
    plain = ids.clone()
    plain[1, torch.isin(plain[1], torch.tensor(head.token_ids))] = 5
    head(hidden_states=hidden, input_ids=plain, teacher={"temporal": temporal, "temporal_mask": [True, False]})
    with pytest.raises(ValueError, match=r"sample\(s\) \[1\] carry a temporal teacher but not all 4 <synergy> tokens"):
        head(hidden_states=hidden, input_ids=plain, teacher={"temporal": temporal})
    twice = ids.clone()
    twice[0, 0] = head.token_ids[2]
    with pytest.raises(ValueError, match=r"sample\(s\) \[0\] hold a <synergy> token more than once"):
        head(hidden_states=hidden, input_ids=twice, teacher={})
    with pytest.raises(ValueError, match=r"unknown teacher key\(s\) \['video'\]"):
        head(hidden_states=hidden, input_ids=ids, teacher={"video": temporal})
    with pytest.raises(
        ValueError, match=r"teacher spatial must be \[batch=2, tokens, spatial_dim=5\], got \(2, 8, 6\)"
    ):
        head(hidden_states=hidden, input_ids=ids, teacher={"spatial": temporal})
    with pytest.raises(ValueError, match=r"fewer valid tokens \(\[3, 3\]\) than 4"):
        head(hidden_states=hidden, input_ids=ids, teacher={"temporal": temporal[:, :3]})


def test_pool_tokens_respects_padding_and_order():
    features = torch.arange(12.0).reshape(2, 6, 1)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    pooled = pool_tokens(features, 2, mask)
    assert pooled[0, :, 0].tolist() == [1.0, 3.5]  # tokens 0,1,2 | 3,4 (token 5 is padding)
    assert pooled[1, :, 0].tolist() == [7.0, 10.0]
    empty = pool_tokens(features, 2, torch.zeros(2, 6, dtype=torch.bool))
    assert torch.equal(empty, torch.zeros(2, 2, 1))


def test_projector_designs_differ_as_documented(polyv):
    _, head, _ = polyv
    temporal, spatial = head.projectors["temporal"], head.projectors["spatial"]
    assert [type(m).__name__ for m in temporal] == ["Linear", "GELU", "Linear"]
    assert isinstance(spatial, GeometricProjector)
    x = torch.randn(3, 32)
    z = spatial.inp(x)
    torch.testing.assert_close(spatial(x), spatial.out(z + spatial.block(z)))
    torch.testing.assert_close(spatial(x * 7 + 2), spatial(x), atol=1e-4, rtol=0)  # input LayerNorm: scale-free


@pytest.mark.parametrize(
    ("params", "where", "message"),
    [
        ({"num_tokens": 2}, "params", "set temporal_dim and/or spatial_dim"),
        ({"temporal_dim": 4, "token_format": "<syn>"}, "params", "must contain {i}"),
        ({"temporal_dim": 4, "num_tokens": 0}, "params.num_tokens", "greater than or equal to 1"),
    ],
)
def test_polyv_bad_params(params, where, message):
    with pytest.raises(ConfigError) as info:
        build("polyv_synergy", params)
    assert message in dict(info.value.problems)[where]


# ---- Vid-LLM cross-task adapter ---------------------------------------------------------------------------------
def test_cta_losses_against_hand_computed_values():
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    teacher = torch.tensor([[2.0, 0.0], [3.0, 0.0]])
    assert float(geometry_loss(student, teacher)) == pytest.approx(1.0)  # (0 + |(0,1)-(1,0)|^2) / 2
    assert float(language_loss(student, teacher)) == pytest.approx(1 - 1 / math.sqrt(2))  # cos((.5,.5), (1,0))
    assert float(structure_loss(student, teacher)) == pytest.approx(0.5)  # |I - ones|_F^2 / 2^2
    wide = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])  # widths may differ: only the Gram matrices meet
    assert float(structure_loss(student, wide)) == pytest.approx(0.5)


@pytest.fixture(scope="module")
def cta():
    torch.manual_seed(0)
    model = tiny_model("qwen2_5_vl")
    head = build("vidllm_cta", {"num_bridge": 3, "width": 8, "heads": 1, "spatial_dim": 5, "semantic_dim": 5})
    head.prepare(model)
    return model, head


def _identity_attention(attention: torch.nn.MultiheadAttention) -> None:
    width = attention.embed_dim
    with torch.no_grad():
        attention.in_proj_weight.copy_(torch.eye(width).repeat(3, 1))
        attention.in_proj_bias.zero_()
        attention.out_proj.weight.copy_(torch.eye(width))
        attention.out_proj.bias.zero_()


def _attend(q, k, v):
    return torch.softmax(q @ k.T / math.sqrt(q.shape[-1]), dim=-1) @ v


def test_bridge_tokens_read_both_streams_and_feed_back(cta):
    _, head = cta
    for attention in (head.read_geom, head.read_lang, head.fuse_geom, head.fuse_lang):
        _identity_attention(attention)
    tokens = torch.randn(1, 4, 32)
    geom, lang = head.adapt(tokens)
    g, l = head.phi_geom(tokens[0]), head.phi_lang(tokens[0])
    bridge = _attend(head.bridge, g, g) + _attend(head.bridge, l, l)  # T'_bridge, Vid-LLM eq. 2
    torch.testing.assert_close(geom[0], g + _attend(g, bridge, bridge), atol=1e-5, rtol=0)
    torch.testing.assert_close(lang[0], l + _attend(l, bridge, bridge), atol=1e-5, rtol=0)


def test_cta_forward_on_visual_tokens_with_masks(cta):
    model, head = cta
    a, b = tiny_inputs("qwen2_5_vl", "image", seed=1), tiny_inputs("qwen2_5_vl", "text", seed=2, text_len=18)
    ids = torch.cat([a["input_ids"], b["input_ids"]])
    hidden = torch.randn(2, ids.shape[1], 32)
    spatial, semantic = torch.randn(2, 8, 5), torch.randn(2, 4, 5)
    teacher = {"spatial": spatial, "semantic": semantic, "spatial_mask": [1, 0], "semantic_mask": [1, 0]}
    losses = head(hidden_states=hidden, input_ids=ids, teacher=teacher)
    assert set(losses) == {"cta_geometry", "cta_language", "cta_structure"}
    visual = hidden[0][ids[0] == IMAGE_ID][None]  # 4 image tokens of sample 0 (sample 1 is text only)
    geom, lang = head.adapt(visual)
    target_geo = spatial[0].reshape(4, 2, 5).mean(1)  # 8 teacher tokens pooled to the 4 student tokens
    torch.testing.assert_close(losses["cta_geometry"], geometry_loss(head.to_spatial(geom[0]), target_geo))
    torch.testing.assert_close(losses["cta_language"], language_loss(head.to_semantic(lang[0]), semantic[0]))
    z_student, z_teacher = torch.cat([geom[0], lang[0]]), torch.cat([target_geo, semantic[0]])
    torch.testing.assert_close(losses["cta_structure"], structure_loss(z_student, z_teacher))
    with pytest.raises(ValueError, match="sample 1 carries a spatial teacher but has no visual tokens"):
        head(hidden_states=hidden, input_ids=ids, teacher={"spatial": spatial})
    only_geo = head(hidden_states=hidden, input_ids=ids, teacher={"spatial": spatial, "spatial_mask": [1, 0]})
    assert only_geo["cta_structure"].item() == 0 == only_geo["cta_language"].item()
    torch.testing.assert_close(only_geo["cta_geometry"], losses["cta_geometry"])


def test_cta_params_are_checked():
    with pytest.raises(ConfigError, match="spatial_dim .4. must equal semantic_dim .6."):
        build("vidllm_cta", {"spatial_dim": 4, "semantic_dim": 6})
    head = build("vidllm_cta", {"spatial_dim": 4, "structure": False, "heads": 5})
    assert head.loss_names == ("cta_geometry",)
    with pytest.raises(ValueError, match="heads=5 must divide the width 32"):
        head.prepare(tiny_model("qwen2_5_vl"))
    with pytest.raises(ValueError, match="qwen2 has no image/video token ids"):
        build("vidllm_cta", {"spatial_dim": 4, "structure": False}).prepare(tiny_model("qwen2"))
