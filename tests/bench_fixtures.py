"""Small benchmark folders in exactly the layouts their authors release (docs/evaluation.md), with synthetic
content: images embedded in parquet as the HF `Image` struct, videos as mp4 (extracted or inside the released
zip archives), scenes as `posed_images/<scene_id>/` folders."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "white": (240, 240, 240)}


def png_bytes(colour: str, size: tuple[int, int] = (56, 56)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, COLOURS[colour]).save(buffer, format="PNG")
    return buffer.getvalue()


def image_cell(colour: str) -> dict:
    return {"bytes": png_bytes(colour), "path": None}


def write_parquet(path: Path, rows: list[dict], schema: pa.Schema) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def mmstar(root: Path) -> Path:
    """`mmstar.parquet` with MMStar's columns: options inside the question, a bare letter answer."""
    schema = pa.schema(
        [
            ("index", pa.int64()),
            ("question", pa.string()),
            ("image", IMAGE),
            ("answer", pa.string()),
            ("category", pa.string()),
            ("l2_category", pa.string()),
            ("meta_info", pa.struct([("source", pa.string()), ("split", pa.string()), ("image_path", pa.string())])),
        ]
    )
    rows = []
    axes = [("coarse perception", "image scene and topic"), ("coarse perception", "image emotion")]
    axes += [("math", "geometry"), ("math", "statistical reasoning")]
    for i, (colour, (category, axis)) in enumerate(zip(["red", "green", "blue", "white"], axes)):
        options = ["red", "green", "blue", "white"]
        question = "What colour fills the image?\nOptions: " + ", ".join(
            f"{'ABCD'[k]}: {o}" for k, o in enumerate(options)
        )
        rows.append(
            {
                "index": i,
                "question": question,
                "image": image_cell(colour),
                "answer": "ABCD"[options.index(colour)],
                "category": category,
                "l2_category": axis,
                "meta_info": {"source": "MMBench", "split": "val", "image_path": f"images/{i}.jpg"},
            }
        )
    return write_parquet(root / "mmstar.parquet", rows, schema)


def cvbench(root: Path) -> Path:
    """`test_2d.parquet` and `test_3d.parquet` with CV-Bench's 15 columns ("(A)" answers, a `prompt`)."""
    schema = pa.schema(
        [
            ("idx", pa.int64()),
            ("type", pa.string()),
            ("task", pa.string()),
            ("image", IMAGE),
            ("question", pa.string()),
            ("choices", pa.list_(pa.string())),
            ("answer", pa.string()),
            ("prompt", pa.string()),
            ("filename", pa.string()),
            ("source", pa.string()),
            ("source_dataset", pa.string()),
            ("source_filename", pa.string()),
            ("target_class", pa.string()),
            ("target_size", pa.int64()),
            ("bbox", pa.list_(pa.float64())),
        ]
    )

    def row(idx, kind, task, source, choices, answer, colour):
        question = "How many circles are in the image?" if task == "Count" else "Which object is closer?"
        prompt = (
            question
            + " Select from the following choices.\n"
            + "\n".join(f"({'ABCD'[k]}) {c}" for k, c in enumerate(choices))
        )
        return {
            "idx": idx,
            "type": kind,
            "task": task,
            "image": image_cell(colour),
            "question": question,
            "choices": choices,
            "answer": f"({answer})",
            "prompt": prompt,
            "filename": f"img/{kind}/{task.lower()}/{source.lower()}_{idx}.png",
            "source": source,
            "source_dataset": f"{source} Validation Set",
            "source_filename": f"{idx}.jpg",
            "target_class": None,
            "target_size": None,
            "bbox": None,
        }

    two_d = [
        row(0, "2D", "Count", "ADE20K", ["3", "2", "1", "0"], "C", "red"),
        row(1, "2D", "Relation", "ADE20K", ["left", "right"], "A", "green"),
        row(2, "2D", "Count", "COCO", ["1", "2", "3", "4"], "B", "blue"),
        row(3, "2D", "Relation", "COCO", ["above", "below"], "B", "white"),
    ]
    three_d = [
        row(4, "3D", "Depth", "Omni3D", ["table", "chair"], "A", "red"),
        row(5, "3D", "Distance", "Omni3D", ["lamp", "sofa"], "B", "green"),
    ]
    write_parquet(root / "test_2d.parquet", two_d, schema)
    write_parquet(root / "test_3d.parquet", three_d, schema)
    return root


def mp4_bytes(colour: str, frames: int = 6, size: int = 56) -> bytes:
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for t in range(frames):
            array = np.full((size, size, 3), COLOURS[colour], dtype=np.uint8)
            array[:, : (t + 1) * size // frames] //= 2
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


VSI_ROWS = [
    {
        "id": 0,
        "dataset": "scannet",
        "scene_name": "scene0011_00",
        "question_type": "object_counting",
        "question": "How many chair(s) are in this room?",
        "ground_truth": "4",
        "options": None,
    },
    {
        "id": 1,
        "dataset": "arkitscenes",
        "scene_name": "41069025",
        "question_type": "object_rel_direction_easy",
        "question": "If I am standing by the stove and facing the sofa, is the tv to the left or the right of the sofa?",
        "ground_truth": "A",
        "options": ["A. left", "B. right"],
    },
    {
        "id": 2,
        "dataset": "arkitscenes",
        "scene_name": "41069025",
        "question_type": "object_rel_direction_hard",
        "question": "Standing by the bed facing the door, is the lamp front-left, front-right, back-left or back-right?",
        "ground_truth": "C",
        "options": ["A. front-left", "B. front-right", "C. back-left", "D. back-right"],
    },
    {
        "id": 3,
        "dataset": "scannetpp",
        "scene_name": "45b0dac5e3",
        "question_type": "room_size_estimation",
        "question": "What is the size of this room (in square meters)?",
        "ground_truth": "30.9",
        "options": None,
    },
    {
        "id": 4,
        "dataset": "scannet",
        "scene_name": "scene0011_00",
        "question_type": "route_planning",
        "question": "How do I get from the door to the desk?",
        "ground_truth": "B",
        "options": ["A. Turn Left, Turn Right", "B. Turn Right, Turn Left", "C. Turn Back, Turn Left"],
    },
]


def vsibench(root: Path, zipped: bool = True) -> Path:
    """The original VSI-Bench release: `test-00000-of-00001.parquet` and one zip per source dataset holding
    `<dataset>/<scene_name>.mp4` (`zipped=False`: the zips extracted in place)."""
    schema = pa.schema(
        [
            ("id", pa.int64()),
            ("dataset", pa.string()),
            ("scene_name", pa.string()),
            ("question_type", pa.string()),
            ("question", pa.string()),
            ("ground_truth", pa.string()),
            ("options", pa.list_(pa.string())),
        ]
    )
    write_parquet(root / "test-00000-of-00001.parquet", VSI_ROWS, schema)
    scenes = sorted({(r["dataset"], r["scene_name"]) for r in VSI_ROWS})
    for k, (dataset, scene) in enumerate(scenes):
        video = mp4_bytes(list(COLOURS)[k % 4])
        if zipped:
            with zipfile.ZipFile(root / f"{dataset}.zip", "a") as zf:
                zf.writestr(f"{dataset}/{scene}.mp4", video)
        else:
            (root / dataset).mkdir(parents=True, exist_ok=True)
            (root / dataset / f"{scene}.mp4").write_bytes(video)
    return root


def videomme(root: Path) -> Path:
    """`videomme/test-00000-of-00001.parquet` (11 columns) and `videos_chunked_01.zip` holding
    `data/<videoID>.mp4`."""
    schema = pa.schema(
        [(c, pa.string()) for c in ("video_id", "duration", "domain", "sub_category", "url", "videoID")]
        + [("question_id", pa.string()), ("task_type", pa.string()), ("question", pa.string())]
        + [("options", pa.list_(pa.string())), ("answer", pa.string())]
    )
    rows = []
    videos = [("001", "fFjv93ACGo8", "short", "Knowledge"), ("002", "xYzAbCdEf12", "long", "Life Record")]
    for video_id, youtube, duration, domain in videos:
        for q in range(1, 3):
            rows.append(
                {
                    "video_id": video_id,
                    "duration": duration,
                    "domain": domain,
                    "sub_category": "Humanity & History" if domain == "Knowledge" else "Daily Life",
                    "url": f"https://www.youtube.com/watch?v={youtube}",
                    "videoID": youtube,
                    "question_id": f"{video_id}-{q}",
                    "task_type": "Counting Problem" if q == 1 else "Attribute Perception",
                    "question": "What colour is the video?" if q == 1 else "How many objects appear?",
                    "options": ["A. Red.", "B. Green.", "C. Blue.", "D. White."],
                    "answer": "ABCD"[(int(video_id) + q) % 4],
                }
            )
    write_parquet(root / "videomme" / "test-00000-of-00001.parquet", rows, schema)
    with zipfile.ZipFile(root / "videos_chunked_01.zip", "w") as zf:
        for k, (_, youtube, _, _) in enumerate(videos):
            zf.writestr(f"data/{youtube}.mp4", mp4_bytes(list(COLOURS)[k]))
    return root


def posed_scene(folder: Path, views: int = 4, size: tuple[int, int] = (64, 48), seed: int = 0) -> Path:
    """A `posed_images/<scene_id>/` folder: 00000.jpg colour, 00000.png depth (mm), 00000.txt pose, every 10th
    frame, plus 4x4 `intrinsic.txt` and `depth_intrinsic.txt`."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    k = np.array([[50.0, 0, size[0] / 2, 0], [0, 50.0, size[1] / 2, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    np.savetxt(folder / "intrinsic.txt", k, fmt="%f")
    np.savetxt(folder / "depth_intrinsic.txt", k, fmt="%f")
    for v in range(views):
        stem = f"{v * 10:05d}"
        colour = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(colour).save(folder / f"{stem}.jpg")
        depth = rng.integers(500, 4000, size=(size[1], size[0])).astype(np.uint16)
        Image.fromarray(depth).save(folder / f"{stem}.png")
        pose = np.eye(4)
        pose[:3, 3] = [0.1 * v, 0.0, 0.0]
        np.savetxt(folder / f"{stem}.txt", pose, fmt="%f")
    return folder


SCANQA_ROWS = [
    {
        "answers": ["dark brown", "brown"],
        "object_ids": [4, 5],
        "object_names": ["chair", "chair"],
        "question": "What color is the chair in the kitchen?",
        "question_id": "val-scene0011-0",
        "scene_id": "scene0011_00",
    },
    {
        "answers": ["2", "two chairs"],
        "object_ids": [4, 5],
        "object_names": ["chair", "chair"],
        "question": "How many chairs are at the table?",
        "question_id": "val-scene0011-1",
        "scene_id": "scene0011_00",
    },
    {
        "answers": ["on the left of the bed"],
        "object_ids": [7],
        "object_names": ["night_stand"],
        "question": "Where is the night stand?",
        "question_id": "val-scene0015-0",
        "scene_id": "scene0015_00",
    },
]


def scanqa(root: Path) -> tuple[Path, Path]:
    """(`ScanQA_v1.0_val.json`, the scenes folder `scannet/posed_images`)."""
    root.mkdir(parents=True, exist_ok=True)
    file = root / "ScanQA_v1.0_val.json"
    file.write_text(json.dumps(SCANQA_ROWS))
    scenes = root / "scannet" / "posed_images"
    for k, scene in enumerate(sorted({r["scene_id"] for r in SCANQA_ROWS})):
        posed_scene(scenes / scene, seed=k)
    return file, scenes


SQA_QUESTIONS = [
    (
        "scene0050_00",
        "I am standing by the ottoman on my right facing a couple of toolboxes.",
        "What instrument in front of me is ebony and ivory?",
        220602000002,
        "piano",
    ),
    ("scene0050_00", "I am sitting on the sofa.", "Is the door to my left open?", 220602000003, "no"),
    ("scene0015_00", "I just entered the room.", "How many chairs are in front of me?", 220602000004, "two"),
    ("scene0015_00", "I face the window.", "Which side is the bed on?", 220602000005, "left"),
]


def sqa3d(root: Path) -> tuple[Path, Path]:
    """(`sqa_task/` with SQA3D's two dict-wrapped balanced test files, the scenes folder)."""
    folder = root / "sqa_task" / "balanced"
    folder.mkdir(parents=True, exist_ok=True)
    info = {"description": "This is v1.0 of the SQA3D dataset.", "version": "1.0", "year": 2022}
    licence = {"url": "http://creativecommons.org/licenses/by/4.0/", "name": "CC BY 4.0"}
    questions = {
        "info": info,
        "license": licence,
        "data_type": "scannet",
        "data_subtype": "v2",
        "task_type": "Situated question answering",
        "questions": [
            {"scene_id": s, "situation": sit, "alternative_situation": [], "question": q, "question_id": qid}
            for s, sit, q, qid, _ in SQA_QUESTIONS
        ],
    }
    annotations = {
        "info": info,
        "license": licence,
        "data_type": "scannet",
        "data_subtype": "v2",
        "annotations": [
            {
                "scene_id": s,
                "question_type": "N/A",
                "answer_type": "other",
                "question_id": qid,
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": 1}],
                "rotation": {"_x": 0, "_y": 0, "_z": -0.99, "_w": -0.03},
                "position": {"x": 0.7, "y": -0.03, "z": 0},
            }
            for s, _, _, qid, a in reversed(SQA_QUESTIONS)  # joined by question_id, not by order
        ],
    }
    (folder / "v1_balanced_questions_test_scannetv2.json").write_text(json.dumps(questions))
    (folder / "v1_balanced_sqa_annotations_test_scannetv2.json").write_text(json.dumps(annotations))
    scenes = root / "scannet" / "posed_images"
    for k, scene in enumerate(sorted({q[0] for q in SQA_QUESTIONS})):
        posed_scene(scenes / scene, seed=10 + k)
    return root / "sqa_task", scenes
