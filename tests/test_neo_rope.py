"""NEO-ov native RoPE on hand-built sequences: (t, h, w) indices, per-group frequencies, the mixed mask."""

import pytest
import torch
import transformers

import moekit.plugins.registry as registry
from moekit.config import ConfigError
from moekit_plugins.position import NativeRope


def rope(**params) -> NativeRope:
    return registry.registry().build("position_encoder", "neo_native_rope", params)


# text(3) | image unit 1: 2 x 3 tokens | text(2) | frame unit 2: 1 x 2 | frame unit 3: 1 x 2 | text(1)
UNITS = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 2, 2, 3, 3, 0]])
GRIDS = [[(2, 3), (1, 2), (1, 2)]]


def test_index_of_a_hand_built_sequence():
    t, h, w = rope().index(UNITS, GRIDS)[:, 0].tolist()
    assert t == [0, 1, 2, 3, 3, 3, 3, 3, 3, 4, 5, 6, 6, 7, 7, 8]
    assert h == [0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert w == [0, 0, 0, 0, 1, 2, 0, 1, 2, 0, 0, 0, 1, 0, 1, 0]


def test_index_skips_left_padding_and_batches_differ():
    units = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    index = rope().index(units, [[(1, 2)], [(2, 1)]], attention_mask=mask)
    assert index[0, 1].tolist() == [0, 0, 0, 1, 2, 2]
    assert index[1, 1].tolist() == [0, 0, 0, 0, 0, 1]  # a 2 x 1 unit: rows 0 and 1, column 0
    assert index[2, 1].tolist() == [0, 0, 0, 0, 0, 0]
    assert index[0, 0].tolist() == [0, 1, 2, 3, 3, 4]


@pytest.mark.parametrize(
    ("units", "grids", "message"),
    [
        (torch.tensor([[1, 1, 0, 1]]), [[(1, 3)]], "tokens of visual unit 1 are not contiguous"),
        (torch.tensor([[0, 1, 1, 1]]), [[(2, 2)]], "visual unit 1 has 3 tokens, its grid 2x2"),
        (torch.tensor([[0, 1, 2, 2]]), [[(1, 1)]], r"visual unit 2 has no grid \(grids\[0\] has 1\)"),
        (torch.tensor([[0, 1]]), [[(1, 1)], [(1, 1)]], "grids has 2 samples, units has 1"),
    ],
)
def test_bad_units_are_refused(units, grids, message):
    with pytest.raises(ValueError, match=message):
        rope().index(units, grids)


def test_temporal_group_matches_transformers_rope_on_text():
    """The T group keeps the LLM's own RoPE: on text it equals transformers' Qwen3 rotary table (theta 1e6)."""
    config = transformers.Qwen3Config(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    reference = transformers.models.qwen3.modeling_qwen3.Qwen3RotaryEmbedding(config)
    r = rope(head_dim_t=16, head_dim_h=8, head_dim_w=4)
    units = torch.zeros(1, 10, dtype=torch.long)
    cos, sin = r.cos_sin(r.index(units, [[]]))
    positions = torch.arange(10)[None]
    ref_cos, ref_sin = reference(torch.zeros(1, 10, 16), positions)
    torch.testing.assert_close(cos[..., :16], ref_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin[..., :16], ref_sin, atol=1e-6, rtol=0)
    assert torch.equal(cos[..., 16:], torch.ones(1, 10, 12)) and torch.equal(sin[..., 16:], torch.zeros(1, 10, 12))


def test_each_group_has_its_own_base_frequency():
    r = rope(head_dim_t=4, head_dim_h=4, head_dim_w=6, theta_h=100.0, theta_w=10.0)
    index = torch.tensor([[[1]], [[2]], [[3]]])  # t=1, h=2, w=3
    cos, _ = r.cos_sin(index)
    angles = torch.cat(
        [
            torch.tensor([1.0, 1e6 ** (-2 / 4)]).repeat(2),
            2 * torch.tensor([1.0, 100 ** (-2 / 4)]).repeat(2),
            3 * torch.tensor([1.0, 10 ** (-2 / 6), 10 ** (-4 / 6)]).repeat(2),
        ]
    )
    torch.testing.assert_close(cos[0, 0], angles.cos(), atol=1e-6, rtol=0)


def test_scores_depend_only_on_relative_t_h_w():
    r = rope(head_dim_t=8, head_dim_h=4, head_dim_w=4)
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 2, 16, generator=generator), torch.randn(1, 1, 2, 16, generator=generator)

    def score(a, b):
        index = torch.tensor([a, b]).T[:, None, :]  # [3, 1, 2]
        cos, sin = r.cos_sin(index)
        return float(r.rotate(q, cos, sin)[0, 0, 0] @ r.rotate(k, cos, sin)[0, 0, 1])

    base = score((5, 1, 2), (3, 0, 4))
    assert score((9, 4, 3), (7, 3, 5)) == pytest.approx(base, abs=1e-5)
    assert score((9, 1, 2), (7, 0, 4)) == pytest.approx(base, abs=1e-5)
    assert score((5, 2, 2), (3, 0, 4)) != pytest.approx(base, abs=1e-3)  # h matters
    with pytest.raises(ValueError, match=r"head dim 12 != T\+H\+W channel groups 16"):
        r.rotate(torch.zeros(1, 1, 2, 12), *r.cos_sin(torch.zeros(3, 1, 2, dtype=torch.long)))


def test_mixed_mask_is_bidirectional_inside_units_causal_across():
    units = torch.tensor([[0, 1, 1, 0, 2, 2]])
    mask = NativeRope.mask(units)[0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1],
    ]
    padded = NativeRope.mask(units, attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1]]))
    assert not padded[0, :, 0].any() and padded[0, 2, 1]
    additive = NativeRope.additive(padded)
    assert additive.shape == (1, 1, 6, 6) and additive[0, 0, 1, 2] == 0
    assert additive[0, 0, 1, 3] == torch.finfo(torch.float32).min


def test_params_are_checked():
    with pytest.raises(ConfigError, match="head_dim_h must be even"):
        registry.registry().build("position_encoder", "neo_native_rope", {"head_dim_h": 3})
