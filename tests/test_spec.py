"""UpcycleSpec validation, layer layouts, YAML loading and --set overrides."""

import pytest

from moekit.config import ConfigError, apply_overrides
from moekit.upcycle import UpcycleSpec, resolve_layers


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        ("interval:4", [0, 4, 8, 12, 16, 20, 24]),
        ("interval:4:3", [3, 7, 11, 15, 19, 23, 27]),
        ("first_half", list(range(14))),
        ("last_half", list(range(14, 28))),
        ("full", list(range(28))),
        ([27, 0, 5], [0, 5, 27]),
        ("0,4,8", [0, 4, 8]),
    ],
)
def test_layouts(layout, expected):
    assert resolve_layers(layout, 28) == expected


def test_paper_layout_has_seven_moe_layers_in_a_28_layer_decoder():
    assert len(resolve_layers("interval:4", 28)) == 7


def test_missing_layer_names_the_valid_range():
    with pytest.raises(
        ValueError, match=r"layer\(s\) \[28\] do not exist: this decoder has 28 layers \(valid range 0..27\)"
    ):
        resolve_layers([0, 28], 28)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_k": 5, "num_experts": 4}, "top_k=5 is larger than num_experts=4"),
        ({"num_experts": 1}, "greater than or equal to 2"),
        ({"layers": "every:4"}, "unknown layer layout 'every:4'; valid: interval:K"),
        ({"layers": "interval:4:4"}, "offset 4 must be smaller than the step 4"),
        ({"experts": [{"name": "a"}, {"name": "a"}]}, r"repeated: \['a'\]"),
        ({"num_experts": 3, "experts": [{"name": "a"}, {"name": "b"}]}, "num_experts=3 but 2 experts are listed"),
        ({"router": {"init": "uniform"}}, "router.init"),
        ({"topk": 2}, "topk: unknown key"),
    ],
)
def test_bad_specs_are_refused_with_location(kwargs, message):
    with pytest.raises((ValueError, ConfigError), match=message):
        from moekit.config import parse_config

        parse_config(UpcycleSpec, kwargs)


def test_default_experts_are_base_copies_and_modality_follows_name():
    spec = UpcycleSpec(num_experts=3, top_k=1)
    assert [e.source for e in spec.experts] == ["base"] * 3
    spec = UpcycleSpec(experts=[{"name": "image"}, {"name": "3d"}, {"name": "base"}], top_k=2)
    assert spec.num_experts == 3
    assert [e.modality for e in spec.experts] == ["image", "3d", None]


def test_yaml_with_overrides(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("layers: interval:4\nnum_experts: 4\ntop_k: 2\nrouter:\n  init: normal\n")
    spec = UpcycleSpec.from_yaml(path, ["top_k=1", "router.std=0.5", "layers=full"])
    assert (spec.top_k, spec.router.std, spec.layers) == (1, 0.5, "full")


def test_yaml_errors_list_every_problem_with_its_path(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(
        "num_experts: 4\ntop_k: 2\nrouter:\n  init: bogus\n  sdt: 1\nexperts:\n  - name: a\n    noise_scale: -1\n"
    )
    with pytest.raises(ConfigError) as info:
        UpcycleSpec.from_yaml(path)
    text = str(info.value)
    assert str(path) in text
    assert "router.init" in text and "router.sdt: unknown key" in text and "experts[0].noise_scale" in text


def test_set_override_syntax():
    data = {"stages": [{"optimizer": {"lr": 1}}]}
    apply_overrides(data, ["stages[0].optimizer.lr=1e-5", "name=x"])
    assert data == {"stages": [{"optimizer": {"lr": 1e-5}}], "name": "x"}
    with pytest.raises(ConfigError, match=r"index \[3\] does not exist"):
        apply_overrides(data, ["stages[3].optimizer.lr=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides(data, ["lr"])
