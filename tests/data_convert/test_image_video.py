"""The image and video converters (llava-pretrain, llava-video-178k, sharegpt4video) on tiny fixtures written in
the released layouts: file names, field names and nesting as the datasets ship them (see each module's docstring).

Fixture videos are tiny mp4s whose frame k is a flat grey of level 10 + 20 k, so a decoded frame tells which source
frame it is (mpeg4 at qscale 2 keeps a flat level within a few units).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from moekit.cli.app import app
from moekit.data.config import DataConfig
from moekit.data.convert import LayoutError, convert_dataset, format_module
from moekit.data.convert import llava_pretrain as pretrain_mod
from moekit.data.convert import sharegpt4video as sg4v_mod
from moekit.data.loader import build_dataset
from moekit.demo.synth.mp4 import write_mp4

LEVEL = 20  # grey-level step between fixture frames


def picture(path: Path, size=(40, 30), level=100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    jj, ii = np.meshgrid(np.arange(size[0]), np.arange(size[1]))
    rgb = np.stack([jj * 4, ii * 4, np.full_like(jj, level)], -1).astype(np.uint8)
    Image.fromarray(rgb).save(path)


def video(path: Path, frames: int = 12, size=(64, 48)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(path, [np.full((size[1], size[0], 3), 10 + LEVEL * k, np.uint8) for k in range(frames)], fps=4)


def frame_number(image: Image.Image) -> int:
    return round((float(np.asarray(image.convert("L")).mean()) - 10) / LEVEL)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def load_all(out: Path, preprocessor) -> list[dict]:
    config = DataConfig(datasets=[{"name": "conv", "path": str(out / "data.jsonl")}], max_length=4096)
    dataset = build_dataset(config, preprocessor)
    return [dataset[i] for i in range(len(dataset))]


# ---- fixtures in the released layouts ----


def llava_pretrain_src(root: Path) -> Path:
    """liuhaotian/LLaVA-Pretrain: blip_laion_cc_sbu_558k.json (+ its _meta.json) and images.zip extracted."""
    recs = [
        ("004539375", "00453/004539375.jpg", "Render a clear and concise summary of the photo.\n<image>", "a red sofa"),
        ("002239345", "00223/002239345.jpg", "<image>\nWrite a terse but informative summary of the picture.", "a dog"),
        ("001577489", "00157/001577489.jpg", "Share a concise interpretation of the image provided.\n<image>", "a car"),
        ("004031433", "00403/004031433.jpg", "Give a brief description of the image.\n<image>", "a tree"),
    ]
    data, meta = [], []
    for k, (rid, image, question, answer) in enumerate(recs):
        data.append(
            {
                "id": rid,
                "image": image,
                "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
            }
        )
        meta.append({"id": rid, "image": image, "blip_caption": answer, "url": f"http://example.com/{rid}.jpg"})
        if k != 2:  # one image missing from the extracted folder
            picture(root / "images" / image, level=60 * k)
    write_json(root / "blip_laion_cc_sbu_558k.json", data)
    write_json(root / "blip_laion_cc_sbu_558k_meta.json", meta)
    return root


VIDEO_BUCKETS = {
    # folder -> (file, kind) annotation files as released (note where oe / mc sit in the names)
    "0_30_s_academic_v0_1": [
        "0_30_s_academic_v0_1_cap_processed.json",
        "0_30_s_academic_oe_v0_1_qa_processed.json",
        "0_30_s_academic_mc_v0_1_qa_processed.json",
    ],
    "0_30_s_youtube_v0_1": ["0_30_s_youtube_v0_1_cap_processed.json"],
}


def llava_video_src(root: Path) -> Path:
    """lmms-lab/LLaVA-Video-178K: per-duration/source folders, their JSONs, tarballs extracted in place."""
    academic = root / "0_30_s_academic_v0_1"
    video(academic / "academic_source/Charades/RW587.mp4")
    video(academic / "academic_source/ego4d/a1b2c3.mp4", frames=6)
    cap = [
        {"id": "RW587", "conversations": [{"from": "human", "value": "<image>\nDescribe this video in detail."},
                                          {"from": "gpt", "value": "A person walks in."}],
         "data_source": "0_30_s_academic_v0_1", "video": "academic_source/Charades/RW587.mp4"},
        {"id": "a1b2c3", "conversations": [{"from": "human", "value": "<image>\nWhat happens?"},
                                           {"from": "gpt", "value": "Hands fold a shirt."}],
         "data_source": "0_30_s_academic_v0_1", "video": "academic_source/ego4d/a1b2c3.mp4"},
    ]  # fmt: skip
    oe = [
        {"id": "RW587", "conversations": [{"from": "human", "value": "<image>\nWhere does the person go?"},
                                          {"from": "gpt", "value": "To the door."},
                                          {"from": "human", "value": "What colour is the door?"},
                                          {"from": "gpt", "value": "White."}],
         "data_source": "0_30_s_academic_v0_1", "video": "academic_source/Charades/RW587.mp4"},
        {"id": "RW587", "conversations": [{"from": "human", "value": "<image>\nIs it day?"},
                                          {"from": "gpt", "value": "Yes."}],
         "data_source": "0_30_s_academic_v0_1", "video": "academic_source/Charades/RW587.mp4"},
    ]  # fmt: skip
    mc = [
        {"id": "a1b2c3", "conversations": [{"from": "human", "value": "<image>\nWhat is folded?\nA. A shirt\nB. A towel\n"
                                            "Answer with the option's letter from the given choices directly."},
                                           {"from": "gpt", "value": "A."}],
         "data_source": "0_30_s_academic_v0_1", "video": "academic_source/ego4d/a1b2c3.mp4"},
    ]  # fmt: skip
    write_json(academic / VIDEO_BUCKETS["0_30_s_academic_v0_1"][0], cap)
    write_json(academic / VIDEO_BUCKETS["0_30_s_academic_v0_1"][1], oe)
    write_json(academic / VIDEO_BUCKETS["0_30_s_academic_v0_1"][2], mc)
    youtube = root / "0_30_s_youtube_v0_1"
    video(youtube / "liwei_youtube_videos/videos/youtube_video_2024/ytb_7nRmsEw7nsE.mp4", frames=4)
    ytb = [
        {"id": "ytb_7nRmsEw7nsE", "conversations": [{"from": "human", "value": "<image>\nDescribe this video."},
                                                    {"from": "gpt", "value": "A cat jumps."}],
         "data_source": "0_30_s_youtube_v0_1", "video": "liwei_youtube_videos/videos/youtube_video_2024/ytb_7nRmsEw7nsE.mp4"},
        {"id": "ytb_missing", "conversations": [{"from": "human", "value": "<image>\nDescribe this video."},
                                                {"from": "gpt", "value": "Not downloaded."}],
         "data_source": "0_30_s_youtube_v0_1", "video": "liwei_youtube_videos/videos/youtube_video_2024/ytb_missing.mp4"},
    ]  # fmt: skip
    write_json(youtube / VIDEO_BUCKETS["0_30_s_youtube_v0_1"][0], ytb)
    return root


def sharegpt4video_src(root: Path) -> Path:
    """ShareGPT4Video/ShareGPT4Video: sharegpt4video_40k.jsonl and the zip_folder zips extracted in place."""
    video(root / "zip_folder/panda/panda_videos_1/-mdIuelE99E_17.mp4", frames=12)
    video(root / "zip_folder/mixit/mixkit_videos/mixkit-waves-1164.mp4", frames=9, size=(80, 48))
    video(root / "zip_folder/ego4d/ego4d_videos_1/3c0dffd0.mp4", frames=3)  # too short for a non-adjacent clip
    recs = [
        ("-mdIuelE99E_17", "panda_videos_1.zip", "A man paddles a canoe down a river."),
        ("mixkit-waves-1164", "mixkit_videos.zip", "Waves roll onto a beach at sunset."),
        ("3c0dffd0", "ego4d_videos_1.zip", "Hands open a drawer."),
        ("absent-video", "pexels_videos_1.zip", "Never downloaded."),
    ]
    with open(root / "sharegpt4video_40k.jsonl", "w") as fh:
        for video_id, zip_name, summary in recs:
            captions = [
                {"idx": "0", "content": "The first keyframe shows the opening scene."},
                {"idx": "1", "content": "Between the keyframes the scene moves on."},
                {"idx": "-1", "content": summary},
            ]
            rec = {"video_id": video_id, "video_path": f"{video_id}.mp4", "zip_folder": zip_name, "captions": captions}
            fh.write(json.dumps(rec) + "\n")
    return root


SOURCES = {
    "llava-pretrain": llava_pretrain_src,
    "llava-video-178k": llava_video_src,
    "sharegpt4video": sharegpt4video_src,
}


# ---- conversions that load ----


def test_llava_pretrain_converts_skips_missing_images_and_loads(tmp_path, preprocessor):
    src = llava_pretrain_src(tmp_path / "LLaVA-Pretrain")
    summary = convert_dataset("llava-pretrain", src, tmp_path / "out", progress=False)
    out = tmp_path / "out"
    assert summary.written == 3 and dict(summary.skipped) == {"image not found": 1}
    rows = lines(out / "data.jsonl")
    assert [r["id"] for r in rows] == ["004539375", "002239345", "004031433"]
    # the stored path (relative to OUT) is the very image of the source folder
    assert (out / rows[1]["image"]).resolve() == (src / "images/00223/002239345.jpg").resolve()
    assert rows[0]["conversations"][0] == {
        "from": "human",
        "value": "Render a clear and concise summary of the photo.\n<image>",
    }
    assert lines(out / "skipped.jsonl") == [{"record": "001577489", "reason": "image not found"}]
    items = load_all(out, preprocessor)
    assert len(items) == 3 and all(item["image_grid_thw"].shape == (1, 3) for item in items)
    assert all(item["sample_modalities"] == "image" for item in items)


def test_llava_instruct_json_with_text_only_records_and_an_images_folder(tmp_path, preprocessor):
    """llava_v1_5_mix665k style: image paths under a data folder with coco/, gqa/; ShareGPT records have no image."""
    src = tmp_path / "LLaVA"
    data = src / "playground/data"
    picture(data / "coco/train2017/000000033471.jpg")
    picture(data / "gqa/images/2354786.jpg", size=(56, 40))
    recs = [
        {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
         "conversations": [{"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
                           {"from": "gpt", "value": "The bus in the image is white and red."},
                           {"from": "human", "value": "What feature can be seen on the back of the bus?"},
                           {"from": "gpt", "value": "The back of the bus features an advertisement."}]},
        {"id": "i6IyJda_0", "model": "",
         "conversations": [{"from": "human", "value": "How to tell if a customer segment is well segmented?"},
                           {"from": "gpt", "value": "Check that it is homogeneous and distinct."}]},
        {"id": 2354786, "image": "gqa/images/2354786.jpg",
         "conversations": [{"from": "human", "value": "<image>\nIs the sky dark?"}, {"from": "gpt", "value": "Yes"}]},
        {"id": 2354786, "image": "gqa/images/2354786.jpg",
         "conversations": [{"from": "human", "value": "<image>\nWho is wearing a shirt?"}, {"from": "gpt", "value": "The man"}]},
    ]  # fmt: skip
    write_json(src / "llava_v1_5_mix665k.json", recs)
    opts = {"json_file": "llava_v1_5_mix665k.json", "images": str(data)}
    summary = convert_dataset("llava-pretrain", src, tmp_path / "out", opts, progress=False)
    rows = lines(tmp_path / "out/data.jsonl")
    assert summary.written == 4 and dict(summary.modalities) == {"image": 3, "text": 1}
    assert [r["id"] for r in rows] == ["000000033471", "i6IyJda_0", "2354786", "2354786#1"]
    assert "image" not in rows[1] and rows[3]["meta"] == {"source_id": "2354786"}
    items = load_all(tmp_path / "out", preprocessor)
    assert [("pixel_values" in i) for i in items] == [True, False, True, True]


def test_llava_video_reads_the_chosen_sources_and_kinds_and_loads(tmp_path, preprocessor):
    src = llava_video_src(tmp_path / "LLaVA-Video-178K")
    opts = {"kinds": "cap,oe"}
    summary = convert_dataset("llava-video-178k", src, tmp_path / "out", opts, progress=False)
    rows = lines(tmp_path / "out/data.jsonl")
    ids = [r["id"] for r in rows]
    assert ids == [
        "0_30_s_academic_v0_1_cap/RW587",
        "0_30_s_academic_v0_1_cap/a1b2c3",
        "0_30_s_academic_oe_v0_1_qa/RW587",
        "0_30_s_academic_oe_v0_1_qa/RW587#1",  # the oe file repeats the video id
        "0_30_s_youtube_v0_1_cap/ytb_7nRmsEw7nsE",
    ]
    assert dict(summary.skipped) == {"video not found": 1}
    assert rows[2]["conversations"][0]["value"] == "<video>\nWhere does the person go?"
    assert rows[2]["meta"] == {"kind": "oe", "data_source": "0_30_s_academic_v0_1"}
    assert (tmp_path / "out" / rows[0]["video"]).resolve() == (
        src / "0_30_s_academic_v0_1/academic_source/Charades/RW587.mp4"
    ).resolve()
    items = load_all(tmp_path / "out", preprocessor)
    assert all("pixel_values_videos" in i and i["sample_modalities"] == "video" for i in items)

    only = convert_dataset(
        "llava-video-178k", src, tmp_path / "mc", {"sources": "*academic*", "kinds": "mc"}, progress=False
    )
    assert only.written == 1 and lines(tmp_path / "mc/data.jsonl")[0]["id"] == "0_30_s_academic_mc_v0_1_qa/a1b2c3"


def test_sharegpt4video_pairs_the_first_frame_with_a_non_adjacent_clip(tmp_path, preprocessor):
    src = sharegpt4video_src(tmp_path / "ShareGPT4Video")
    summary = convert_dataset("sharegpt4video", src, tmp_path / "out", {"clip_frames": 4}, progress=False)
    out = tmp_path / "out"
    assert summary.written == 2
    assert dict(summary.skipped) == {"video too short for a non-adjacent clip": 1, "video not found": 1}
    rows = {r["id"]: r for r in lines(out / "data.jsonl")}
    canoe = rows["-mdIuelE99E_17"]
    assert canoe["conversations"][1]["value"] == "A man paddles a canoe down a river."
    assert canoe["image"] == "media/sharegpt4video/-mdIuelE99E_17/image.jpg"
    assert frame_number(Image.open(out / canoe["image"])) == 0
    clip = sorted((out / canoe["paired"]["video"]).iterdir(), key=lambda p: int(p.stem))
    # 12 frames, clip_start 0.5: frames 6..11, 4 of them uniformly; never frame 0 or 1 (adjacent to the image)
    assert [frame_number(Image.open(p)) for p in clip] == [6, 8, 9, 11]
    assert canoe["meta"]["clip"] == [6, 11] and canoe["meta"]["frames"] == 12
    assert canoe["meta"]["source_video"].endswith("zip_folder/panda/panda_videos_1/-mdIuelE99E_17.mp4")
    items = {i["sample_ids"]: i for i in load_all(out, preprocessor)}
    assert items["mixkit-waves-1164"]["teacher"]["video"]["frames"].shape == (4, 3, 48, 80)
    assert items["-mdIuelE99E_17"]["sample_modalities"] == "image"


# ---- resume after a kill ----


class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing on the way catches it."""


@pytest.mark.parametrize("fmt", sorted(SOURCES))
def test_a_resumed_run_after_a_kill_gives_the_uninterrupted_output(fmt, tmp_path, monkeypatch):
    src = SOURCES[fmt](tmp_path / "src")
    opts = {"clip_frames": 4} if fmt == "sharegpt4video" else {}
    convert_dataset(fmt, src, tmp_path / "a", opts, progress=False)

    module = format_module(fmt)
    original = module.records

    def dies_after_one(src_, ctx, opts_):
        for n, item in enumerate(original(src_, ctx, opts_)):
            if n == 1:
                raise Killed
            yield item

    monkeypatch.setattr(module, "records", dies_after_one)
    with pytest.raises(Killed):
        convert_dataset(fmt, src, tmp_path / "b", opts, progress=False)
    partial = tmp_path / "b/.data.jsonl.partial"
    with open(partial, "a") as fh:
        fh.write('{"id": "torn-by-the-kill", "conversa')  # the last line was being written
    assert not (tmp_path / "b/convert.json").exists()
    monkeypatch.setattr(module, "records", original)
    decoded = []
    if fmt == "sharegpt4video":  # a resumed run does not decode again what it already wrote
        read_pair = sg4v_mod.read_pair
        monkeypatch.setattr(sg4v_mod, "read_pair", lambda path, o: decoded.append(path.name) or read_pair(path, o))
    summary = convert_dataset(fmt, src, tmp_path / "b", opts, progress=False)
    assert summary.resumed_from > 0
    for name in ("data.jsonl", "skipped.jsonl"):
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes()
    a_media = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    b_media = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert a_media == b_media
    if fmt == "sharegpt4video":
        assert "-mdIuelE99E_17.mp4" not in decoded and "mixkit-waves-1164.mp4" in decoded
        for rel in a_media:
            assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


# ---- wrong layouts ----


def _rename_field(path: Path, old: str, new: str) -> None:
    if path.suffix == ".jsonl":
        recs = [json.loads(line) for line in path.read_text().splitlines()]
        recs[0][new] = recs[0].pop(old)
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    else:
        recs = json.loads(path.read_text())
        recs[0][new] = recs[0].pop(old)
        path.write_text(json.dumps(recs))


WRONG = [
    ("llava-pretrain", "blip_laion_cc_sbu_558k.json", ("conversations", "conversation"), ["#0 id '004539375'", "'conversations'"]),
    ("llava-video-178k", "0_30_s_academic_v0_1/0_30_s_academic_oe_v0_1_qa_processed.json", ("video", "video_path"),
     ["#0 id 'RW587'", "'video'"]),
    ("sharegpt4video", "sharegpt4video_40k.jsonl", ("video_path", "path"), ["line 1", "'video_path'"]),
    ("sharegpt4video", "sharegpt4video_40k.jsonl", ("captions", "caption"), ["line 1", "'captions'"]),
]  # fmt: skip


@pytest.mark.parametrize(("fmt", "file", "rename", "expected"), WRONG)
def test_a_wrong_layout_is_refused_naming_file_record_and_field_before_out_exists(
    fmt, file, rename, expected, tmp_path
):
    src = SOURCES[fmt](tmp_path / "src")
    _rename_field(src / file, *rename)
    with pytest.raises(LayoutError) as info:
        convert_dataset(fmt, src, tmp_path / "out", progress=False)
    message = str(info.value)
    assert str(src / file) in message and all(part in message for part in expected), message
    assert not (tmp_path / "out").exists()


def test_layout_errors_for_folders_and_options(tmp_path):
    src = llava_video_src(tmp_path / "src")
    with pytest.raises(LayoutError, match="match no folder; found 0_30_s_academic_v0_1, 0_30_s_youtube_v0_1"):
        convert_dataset("llava-video-178k", src, tmp_path / "out", {"sources": "1_2_m_*"}, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayoutError, match="no annotation files here"):
        convert_dataset("llava-video-178k", tmp_path / "empty", tmp_path / "out", progress=False)
    pre = llava_pretrain_src(tmp_path / "pre")
    (pre / "images").rename(pre / "elsewhere")
    with pytest.raises(LayoutError, match="neither under .*images nor under"):
        convert_dataset("llava-pretrain", pre, tmp_path / "out", progress=False)
    (pre / "blip_laion_cc_sbu_558k.json").rename(pre / "a.json")
    (pre / "b.json").write_text("[]")
    with pytest.raises(LayoutError, match=r"several annotation files \(a.json, b.json\)"):
        convert_dataset("llava-pretrain", pre, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ---- the streaming JSON reader ----


def test_json_lists_stream_across_chunk_boundaries(tmp_path, monkeypatch):
    records = [
        {"id": i, "value": "ünïcode " * (i % 7), "n": [1.5e3, -2, i], "nested": {"a": [True, None]}} for i in range(60)
    ]
    path = tmp_path / "list.json"
    path.write_text(json.dumps(records, indent=2, ensure_ascii=False))
    monkeypatch.setattr(pretrain_mod, "_CHUNK", 37)  # numbers and strings cut at every possible place
    assert [v for _, v in pretrain_mod.iter_json_list(path)] == records
    conv = tmp_path / "conv.json"
    conv.write_text(json.dumps([{"conversations": [], "text": 'say "conversations"'}] * 25))
    assert pretrain_mod.count_key(conv) == 25
    path.write_text(json.dumps(records[:3], indent=2)[:-30])
    with pytest.raises(ValueError, match=r"list.json:\d+: not valid JSON"):
        list(pretrain_mod.iter_json_list(path))


def test_the_cli_converts_and_lists_formats(tmp_path):
    src = llava_pretrain_src(tmp_path / "LLaVA-Pretrain")
    runner = CliRunner()
    result = runner.invoke(app, ["data", "convert", "llava-pretrain", str(src), "-o", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "wrote 3 samples" in result.output and "image not found" in result.output
    result = runner.invoke(app, ["data", "formats"])
    assert "llava-video-178k" in result.output and "sharegpt4video" in result.output
