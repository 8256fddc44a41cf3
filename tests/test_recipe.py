"""Recipe and pipeline YAML: every shipped file validates, and bad input is refused with its YAML path."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from moekit.cli.app import app
from moekit.config import ConfigError
from moekit.recipe import load_plan

from .recipes import stage, write_recipe

RECIPES = Path(__file__).parents[1] / "recipes"
SHIPPED = sorted(RECIPES.rglob("*.yaml"))


def test_recipes_are_shipped():
    assert {p.name for p in SHIPPED} >= {
        "pipeline.yaml",
        "stage1_1.yaml",
        "stage1_2.yaml",
        "stage2_1.yaml",
        "stage2_2.yaml",
    }


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_shipped_yaml_validates_and_names_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# moekit run recipes/"), first
    assert load_plan(path).stages


def test_polyv_pipeline_follows_table_6():
    plan = load_plan(RECIPES / "polyv" / "pipeline.yaml")
    stages = {s.stage.name: s.stage for s in plan.stages}
    assert list(stages) == ["stage1_1", "stage1_2_image", "stage1_2_video", "stage1_2_3d", "stage2_1", "stage2_2"]
    table = {  # lr, weight decay, warm-up ratio, schedule
        "stage1_1": (2e-5, 0.05, 0.03, "cosine"),
        "stage1_2_video": (2e-6, 0.05, 0.03, "cosine"),
        "stage2_1": (1e-4, 0.05, 0.05, "cosine"),
        "stage2_2": (1e-5, 0.1, 0.05, "constant"),
    }
    for name, (lr, wd, warm, kind) in table.items():
        s = stages[name]
        assert (s.optimizer.lr, s.optimizer.weight_decay, s.schedule.warmup_ratio, s.schedule.kind) == (
            lr,
            wd,
            warm,
            kind,
        )
        assert s.precision == "bf16"
    assert [str(g) for g in stages["stage1_1"].trainable] == ["projector"]
    assert all(stages[f"stage1_2_{m}"].save == "ffn_only" for m in ("image", "video", "3d"))
    upcycle = stages["stage2_1"].start.upcycle
    assert (upcycle.layers, upcycle.num_experts, upcycle.top_k) == ("interval:4", 4, 2)
    assert upcycle.stage_refs() == ["stage1_1", "stage1_2_image", "stage1_2_video", "stage1_2_3d"]
    first, second = stages["stage2_1"].phases
    assert {str(g) for g in first.trainable} >= {"router", "synergy_heads"} and "experts" not in map(
        str, first.trainable
    )
    assert {str(g) for g in second.trainable} >= {"experts", "router", "synergy_heads"}
    assert {str(g) for g in stages["stage2_2"].trainable} == {"router", "experts"}
    assert all(s.recipe.output_dir == "runs/polyv" for s in plan.stages)


def test_problems_are_reported_together_with_their_yaml_paths(tmp_path):
    bad = [
        stage("a", trainable=["projektor"], optimizer={"lr": -1.0}, lr_warmup=3),
        stage("b", **{"from": {"upcycle": {"top_k": 5, "num_experts": 2}}}, trainable=[{"pattern": "("}]),
        stage("c", trainable=["lora"], steps=None),
        stage("d", **{"from": "bas"}, trainable=["ffn"], schedule={"kind": "cosine", "warmup_ratio": 1.5}),
    ]
    path = write_recipe(tmp_path, tmp_path, bad)
    with pytest.raises(ConfigError) as info:
        load_plan(path)
    problems = dict(info.value.problems)
    assert "unknown group 'projektor'; valid: projector" in problems["stages[0].trainable[0]"]
    assert "greater than 0" in problems["stages[0].optimizer.lr"]
    assert "unknown key" in problems["stages[0].lr_warmup"]
    assert "top_k=5 is larger than num_experts=2" in problems["stages[1].from.upcycle"]
    assert "not a valid regular expression" in problems["stages[1].trainable[0]"]
    assert "give either steps or epochs" in problems["stages[2]"] and "needs a lora: section" in problems["stages[2]"]
    assert "expected 'base', {stage: NAME}" in problems["stages[3].from"]
    assert "less than 1" in problems["stages[3].schedule.warmup_ratio"]
    assert str(path) in str(info.value)


def test_stage_consistency_rules(tmp_path):
    cases = [
        (stage("a", trainable=["ffn"], phases=[{"name": "p", "trainable": ["ffn"]}]), "either trainable"),
        (
            stage("a", phases=[{"name": "p", "trainable": ["ffn"]}, {"name": "q", "trainable": ["router"]}]),
            "only the last phase",
        ),
        (
            stage(
                "a",
                phases=[
                    {"name": "p", "steps": 2, "trainable": ["ffn"]},
                    {"name": "q", "steps": 2, "trainable": ["router"]},
                ],
                steps=3,
            ),
            "add up to 4",
        ),
        (stage("a", trainable=["ffn"], data_source="data"), "data section is required"),
        (stage("a", trainable=["synergy_heads"]), "needs losses.synergy"),
        (stage("a", trainable=["ffn"], save="lora_adapter"), "needs a lora"),
        (
            stage("a", phases=[{"name": "p", "steps": 1, "trainable": ["ffn"]}], distributed={"mode": "deepspeed"}),
            "not supported with DeepSpeed",
        ),
        (stage("a", trainable=["ffn"], distributed={"mode": "fsdp"}), "distributed.mode"),
    ]
    for spec, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_plan(write_recipe(tmp_path, tmp_path, [spec]))


def test_stage_references_must_point_backwards(tmp_path):
    stages = [stage("a", **{"from": {"stage": "b"}}, trainable=["ffn"]), stage("b", trainable=["ffn"])]
    with pytest.raises(ConfigError, match="uses 'b', which runs later"):
        load_plan(write_recipe(tmp_path, tmp_path, stages))
    with pytest.raises(ConfigError, match="is used twice"):
        load_plan(write_recipe(tmp_path, tmp_path, [stage("a", trainable=["ffn"])] * 2))


def test_pipeline_checks_names_and_order_across_files(tmp_path):
    write_recipe(tmp_path, tmp_path, [stage("one", trainable=["ffn"])], name="r1.yaml")
    write_recipe(tmp_path, tmp_path, [stage("two", **{"from": {"stage": "three"}}, trainable=["ffn"])], name="r2.yaml")
    write_recipe(
        tmp_path, tmp_path, [stage("three", trainable=["ffn"]), stage("one", trainable=["ffn"])], name="r3.yaml"
    )
    (tmp_path / "p.yaml").write_text("recipes: [r1.yaml, r2.yaml, r3.yaml, missing.yaml]\noutput_dir: shared\n")
    with pytest.raises(ConfigError) as info:
        load_plan(tmp_path / "p.yaml")
    text = str(info.value)
    assert "r2.yaml: stages[0].from: uses stage 'three', which runs later" in text
    assert "r3.yaml: stages[1].name: stage 'one' is also defined in" in text
    assert "recipes[3]: " in text and "missing.yaml: no such file" in text


def test_pipeline_base_and_output_dir_replace_the_recipes_and_overrides_apply(tmp_path):
    write_recipe(tmp_path, tmp_path / "elsewhere", [stage("one", trainable=["ffn"])], name="r1.yaml")
    (tmp_path / "p.yaml").write_text("recipes: [r1.yaml]\nbase: /models/base\noutput_dir: out\n")
    plan = load_plan(tmp_path / "p.yaml", ["base=/models/other"])
    assert plan.stages[0].recipe.base == "/models/other" and plan.stages[0].output_dir == Path("out/one")
    plan = load_plan(tmp_path / "r1.yaml", ["stages[0].optimizer.lr=3e-5", "stages[0].trainable=[router]"])
    assert plan.stages[0].stage.optimizer.lr == 3e-5
    assert [str(g) for g in plan.stages[0].stage.trainable] == ["router"]


def test_cli_validate_and_run_report_problems_in_one_clean_message(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["validate", str(RECIPES / "polyv" / "pipeline.yaml"), "--no-components"])
    assert result.exit_code == 0, result.output
    assert "stage2_1" in result.output and "upcycle 4x top-2 interval:4" in result.output
    path = write_recipe(tmp_path, tmp_path / "no-model", [stage("a", trainable=["ffn"], optimizer={"lr": 0})])
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 1 and "stages[0].optimizer.lr" in result.output and "Traceback" not in result.output
    path = write_recipe(tmp_path, tmp_path / "no-model", [stage("a", trainable=["ffn"])])
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 1 and "is not a local checkpoint directory" in result.output
    assert not (tmp_path / "runs").exists()  # nothing is written before the checks pass
