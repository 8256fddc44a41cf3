"""The full-size PolyV recipes (recipes/polyv/, ablations/): token budgets that hold PolyV's media, Table 6's sample
counts, Table 5's parameter accounting, data paths that `moekit data convert` writes, ablations that stay overlays.
"""

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import moekit
from moekit.arch import resolve_arch
from moekit.data.check import clip_ids, fitted_size, image_ids
from moekit.data.config import FramesSpec
from moekit.data.mixture import mixture_order
from moekit.data.qwen_vision import QwenPixelConfig, video_size
from moekit.data.vision import QwenVision, build_vision
from moekit.modeling.meta_model import meta_model, read_config
from moekit.moe.accounting import account
from moekit.recipe import load_plan

POLYV = Path(__file__).parents[1] / "recipes" / "polyv"
ABLATIONS = POLYV / "ablations"
FULL = sorted(POLYV.rglob("*.yaml"))
QWEN_7B = Path(__file__).parent / "fixtures" / "qwen2_5_vl_7b_config.json"  # the released config.json values
# Qwen/Qwen2.5-VL-7B-Instruct's released preprocessor_config.json (it names no video sizes: the video processor's
# defaults apply, 128*28*28 to 768*28*28 pixels per frame, moekit's QwenPixelConfig defaults).
PREPROCESSOR = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}
TEXT_MARGIN = 1500  # tokens left for the chat template, the question and the answer


def all_stages():
    return [(path, planned.stage) for path in FULL for planned in load_plan(path).stages]


@pytest.fixture(scope="module")
def qwen7b(tmp_path_factory) -> tuple[QwenVision, Path]:
    """Qwen2.5-VL-7B's vision preprocessing (from its released config files) and a folder of media."""
    root = tmp_path_factory.mktemp("qwen7b")
    shutil.copy(QWEN_7B, root / "config.json")
    (root / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    vision = build_vision(root, "qwen2_5_vl", read_config(root))
    frames = root / "media" / "clip"
    frames.mkdir(parents=True)
    for i in range(32):
        Image.fromarray(np.full((480, 640, 3), 8 * i, np.uint8)).save(frames / f"{i}.png")
    Image.fromarray(np.zeros((480, 640, 3), np.uint8)).save(root / "media" / "image.png")
    Image.fromarray(np.zeros((968, 1296, 3), np.uint8)).save(root / "media" / "scannet_view.png")
    return vision, root / "media"


def test_32_frames_at_640x480_are_6258_tokens_for_qwen2_5_vl(qwen7b):
    vision, media = qwen7b
    # the released file: images up to 16384 tokens; video sizes are moekit's (the video processor's) defaults
    assert vision.pixels == dataclasses.replace(QwenPixelConfig(), max_pixels=12845056)
    # By hand: 640x480 rounds to 644x476 (multiples of 28; 306,544 px, inside the video range 100,352..602,112),
    # 46x34 patches of 14, 23x17 = 391 tokens after the 2x2 merge per temporal patch of 2 frames; 16 of them,
    # plus <|vision_start|> and <|vision_end|>.
    ids = clip_ids(vision, "video", media / "clip", FramesSpec())
    assert len(ids) == 16 * 23 * 17 + 2 == 6258
    assert ids.count(vision.video_id) == 6256
    assert len(image_ids(vision, media / "image.png")) == 23 * 17 + 2 == 393
    assert len(image_ids(vision, media / "scannet_view.png")) == 46 * 35 + 2 == 1612  # stage2_1.yaml's comment
    # qwen-vl-utils caps a clip's pixels too: per frame min(768*28*28, total / frames * 2) with total 128000*28*28*0.9;
    # at 32 frames that is 602,112 px, above a 640x480 frame, so no Qwen processor shrinks PolyV's frames.
    assert min(768 * 28 * 28, 128000 * 28 * 28 * 0.9 / 32 * 2) > 644 * 476


def test_no_frame_fitted_to_640x480_costs_more_than_a_640x480_frame():
    px, spec = QwenPixelConfig(), FramesSpec()
    per_patch = set()
    for width in range(40, 4000, 37):
        for height in range(40, 3000, 41):
            w, h = fitted_size(width, height, spec)
            h, w = video_size(h, w, px)
            per_patch.add((h // 14) * (w // 14) // 4)
    assert max(per_patch) == 391
    # and no cap fits 32 frames into 2048: the smallest frame Qwen's video processor makes is 128 tokens
    assert min(per_patch) >= 128 and 16 * 128 + 2 > 2048


def test_every_full_recipe_budget_holds_polyv_media_plus_text(qwen7b):
    vision, media = qwen7b
    image = len(image_ids(vision, media / "image.png"))
    checked = set()
    for path, stage in all_stages():
        data = stage.data
        assert (data.frames.max_frames, data.frames.max_width, data.frames.max_height) == (32, 640, 480), path
        clip = len(clip_ids(vision, "video", media / "clip", data.frames))
        # a CSQA sample shows an image and a clip; a paired sample adds its <synergy> tokens
        need = clip + image + data.synergy_tokens + TEXT_MARGIN
        assert data.max_length >= need, f"{path}: {stage.name}: max_length {data.max_length} < {need}"
        checked.add(stage.name)
    assert len(checked) == 6 + 15  # the main stages and the ablations'


def test_table6_sample_counts():
    stages = {s.stage.name: s.stage for s in load_plan(POLYV / "pipeline.yaml").stages}
    counts = {name: s.data.samples_per_epoch for name, s in stages.items()}
    assert counts == {
        "stage1_1": 40000,
        "stage1_2_image": 15000,
        "stage1_2_video": 15000,
        "stage1_2_3d": 15000,  # 45K over the three specialists
        "stage2_1": 50000,
        "stage2_2": 40000,
    }
    assert all(
        s.epochs == 1 and s.steps is None and s.data.mixing in ("weighted", "interleave") for s in stages.values()
    )
    # stage 2-2: CSQA's 20K (8K + 6K + 6K) are half of the 40K and each is drawn once
    data = stages["stage2_2"].data
    sizes = [8000, 6000, 6000, 665_000, 178_000, 860_000]
    order = mixture_order(sizes, [d.weight for d in data.datasets], data.mixing, 0, 0, data.samples_per_epoch)
    drawn = [[i for d, i in order if d == k] for k in range(len(sizes))]
    assert [len(x) for x in drawn[:3]] == [8000, 6000, 6000]
    assert all(len(set(x)) == len(x) for x in drawn)


def test_datasets_are_what_moekit_data_convert_writes():
    texts = "".join(p.read_text() for p in POLYV.glob("stage*.yaml"))
    for path, stage in all_stages():
        for spec in stage.data.datasets:
            match = re.fullmatch(r"data/polyv/([\w-]+)/data\.jsonl", spec.path)
            assert match, f"{path}: {spec.path}"
            assert f"-o data/polyv/{match.group(1)}" in texts, f"no convert command writes {spec.path}"


def placement(path: Path) -> tuple[list[int], int, int, int]:
    """The MoE layers the recipe's upcycle step gives Qwen2.5-VL-7B (on the meta device), the activated and total
    parameters it adds, and the dense model's count."""
    upcycle = next(s.stage.start.upcycle for s in load_plan(path).stages if s.stage.start.upcycle is not None)
    model = meta_model(read_config(QWEN_7B))
    layers = resolve_arch(model).layers
    dense = account(model, layers)
    spec = moekit.UpcycleSpec(layers=upcycle.layers, num_experts=upcycle.num_experts, top_k=upcycle.top_k)
    moe = account(moekit.upcycle(model, spec), layers)
    return moe.moe_layers, moe.active - dense.active, moe.total - dense.total, dense.total


@pytest.mark.parametrize(
    "recipe, moe_layers, activated, total",
    [  # Table 5: base 7.0B / 7.0B
        (POLYV / "stage2_1.yaml", 7, 8.4, 11.3),  # Interval(4)
        (ABLATIONS / "layers_first_half.yaml", 7, 8.4, 11.3),
        (ABLATIONS / "layers_last_half.yaml", 7, 8.4, 11.3),
        (ABLATIONS / "layers_full.yaml", 14, 9.9, 15.6),
    ],
    ids=lambda v: v.stem if isinstance(v, Path) else None,
)
def test_table5_parameter_accounting(recipe, moe_layers, activated, total):
    layers, extra_active, extra_total, base = placement(recipe)
    assert len(layers) == moe_layers and max(layers) < 28
    # Table 5's base "7.0B" is the model's name; its increments are what the placement adds
    assert round(7.0 + extra_active / 1e9, 1) == activated and round(7.0 + extra_total / 1e9, 1) == total
    # per MoE layer: one more active and three more stored 3584x18944 SwiGLU FFNs, plus a 4x3584 router
    ffn = 3 * 3584 * 18944
    assert extra_active == moe_layers * (ffn + 4 * 3584)
    assert extra_total == moe_layers * (3 * ffn + 4 * 3584)
    assert base == 8_292_166_656  # what Qwen2.5-VL-7B really holds (vision tower and untied head included)


def half(path: Path) -> list[int]:
    return placement(path)[0]


def test_half_placements_stay_in_their_half():
    assert half(ABLATIONS / "layers_first_half.yaml") == list(range(0, 14, 2))
    assert half(ABLATIONS / "layers_last_half.yaml") == list(range(14, 28, 2))


def _diff(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        return {p for k in a.keys() | b.keys() for p in _diff(a.get(k), b.get(k), f"{prefix}{k}.")}
    return set() if a == b else {prefix.rstrip(".")}


MAIN = {s.stage.name: s.stage.model_dump() for s in load_plan(POLYV / "pipeline.yaml").stages}
UPCYCLE = "start.upcycle"
# ablation stage -> (the main stage it varies, the fields that may differ besides its name)
OVERLAYS = {
    "stage2_1_experts_2": ("stage2_1", {f"{UPCYCLE}.num_experts", f"{UPCYCLE}.experts"}),
    "stage2_1_experts_3": ("stage2_1", {f"{UPCYCLE}.num_experts", f"{UPCYCLE}.experts"}),
    "stage2_1_layers_first_half": ("stage2_1", {f"{UPCYCLE}.layers"}),
    "stage2_1_layers_last_half": ("stage2_1", {f"{UPCYCLE}.layers"}),
    "stage2_1_layers_full": ("stage2_1", {f"{UPCYCLE}.layers"}),
    "stage2_1_teacher_vjepa2_only": ("stage2_1", {"teachers.scene", "losses.synergy"}),
    "stage2_1_teacher_vggt_only": ("stage2_1", {"teachers.video", "losses.synergy"}),
    "stage2_2_fine_only": ("stage2_2", {"start.stage", UPCYCLE}),
}


def test_ablations_differ_from_the_main_stages_only_where_they_say():
    plan = load_plan(ABLATIONS / "pipeline.yaml")
    ablated = [s for s in plan.stages if s.stage.name not in MAIN]
    assert {s.stage.name for s in plan.stages} >= set(MAIN)
    assert all(s.recipe.output_dir == "runs/polyv" for s in plan.stages)
    for planned in ablated:
        name = planned.stage.name
        if name.startswith("stage2_2_") and name not in OVERLAYS:  # the 2-2 after an ablated 2-1
            main, allowed = "stage2_2", {"start.stage"}
            assert planned.stage.start.stage == "stage2_1_" + name.removeprefix("stage2_2_")
        else:
            main, allowed = OVERLAYS[name]
        assert _diff(planned.stage.model_dump(), MAIN[main]) == allowed | {"name"}, name
    assert len(ablated) == 2 * 7 + 1
    # the fine-only model is built exactly as stage 2-1 builds its MoE
    fine = plan.get("stage2_2_fine_only").stage.start.upcycle.model_dump()
    assert fine == MAIN["stage2_1"]["start"]["upcycle"]
    synergy = {n: plan.get(f"stage2_1_teacher_{n}_only").stage.losses.synergy[0].params for n in ("vjepa2", "vggt")}
    assert "spatial_dim" not in synergy["vjepa2"] and "temporal_dim" not in synergy["vggt"]


def test_coarse_only_is_the_main_chain_without_stage_2_2():
    names = [s.stage.name for s in load_plan(ABLATIONS / "coarse_only.yaml").stages]
    assert names == [n for n in MAIN if n != "stage2_2"]


@pytest.mark.parametrize("path", sorted(ABLATIONS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_ablation_loads_as_validate_does_without_data(path):
    plan = load_plan(path)
    assert plan.stages
    # alone, an ablation reads only outputs of the main run (stages 1-1 / 1-2) from runs/polyv
    assert set(plan.external_refs()) <= {"stage1_1", "stage1_2_image", "stage1_2_video", "stage1_2_3d"}
