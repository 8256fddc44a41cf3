"""`moekit csqa build`: loaders on tiny fixtures in the released layouts of PVSG, Action Genome and 3DSSG/3RScan,
the restricted unpickler, the rule generator, the model generator (real tiny VLM: invalid JSON is dropped) and
verifier (real tiny VLM: keeps only what it agrees with), dedupe / balance, the report, the CLI, and the output
read back through moekit's dataset reader."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from moekit.cli.app import app
from moekit.csqa import action_genome, pvsg, threedssg
from moekit.csqa.build import BuildSpec, balance, build_csqa
from moekit.csqa.generate import parse_reply, prompt
from moekit.csqa.graphs import LayoutError
from moekit.csqa.media import write_media
from moekit.csqa.records import Candidate, answers_match, normalise
from moekit.csqa.rules import rule_qas
from moekit.csqa.safe_pickle import UnsafePickleError, load_pickle
from moekit.csqa.templates import load_templates
from moekit.csqa.verify import VerifyItem, model_verifier, verify_prompt
from moekit.data.config import DataConfig, DatasetSpec, FramesSpec
from moekit.data.dataset import ConversationDataset
from moekit.data.media import load_media
from moekit.data.schema import parse_sample, read_records

W, H = 112, 84
VID = "0001_4164158586"


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array) if mode is None else Image.fromarray(array, mode)
    image.save(path)


def _rgb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8)


# ---------------------------------------------------------------- PVSG: data/pvsg.json + vidor/frames + vidor/masks
def _pvsg_boxes(t: int) -> dict[int, tuple[int, int, int, int]]:
    boxes = {1: (0, 0, W, 10), 2: (5, 20, 25, 70), 3: (30 + 3 * t, 30, 45 + 3 * t, 50), 4: (90, 60, 105, 80)}
    if t <= 3:
        boxes[6] = (60, 5, 70, 15)  # cup: only at the start (gone in the clip)
    if t >= 8:
        boxes[5] = (92, 50, 100, 58)  # candle: enters during the clip
    return boxes


def _pvsg_record(**overrides):
    record = {
        "video_id": VID,
        "meta": {"height": H, "width": W, "fps": 5, "duration": 4.0, "num_frames": 20},
        "objects": [
            {"object_id": 1, "category": "wall", "is_thing": False, "status": []},
            {"object_id": 2, "category": "adult", "is_thing": True, "status": []},
            {"object_id": 3, "category": "child", "is_thing": True, "status": []},
            {"object_id": 4, "category": "cake", "is_thing": True, "status": []},
            {"object_id": 5, "category": "candle", "is_thing": True, "status": []},
            {"object_id": 6, "category": "cup", "is_thing": True, "status": []},
        ],
        "relations": [
            [2, 3, "holding", [[0, 19]]],
            [2, 4, "looking at", [[0, 2]]],
            [3, 4, "looking at", [[12, 19]]],
            [2, 5, "picking", [[10, 19]]],
            [2, 3, "hugging", [[10, 19]]],
            [2, 3, "flying", [[0, 19]]],  # not in the predicate list: left out
        ],
        "captions": [{"time": "0000-0019", "description": "A woman (2) holds a child (3)."}],
        "qa_pairs": [],
        "summary": "a birthday",
    }
    record.update(overrides)
    return record


def make_pvsg(root: Path, record: dict | None = None, masks: bool = True) -> Path:
    data = root / "data"
    anno = {
        "objects": {"thing": ["adult", "child", "cake", "candle", "cup"], "stuff": ["wall"]},
        "relations": ["holding", "looking at", "picking", "hugging", "sitting on"],
        "split": {"vidor": {"train": [VID], "val": []}, "epic_kitchen": {"train": [], "val": []}},
        "data": [record or _pvsg_record()],
    }
    data.mkdir(parents=True)
    (data / "pvsg.json").write_text(json.dumps(anno))
    for t in range(20):
        _png(data / "vidor" / "frames" / VID / f"{t:04d}.png", _rgb(t))
        if masks:
            mask = np.zeros((H, W), np.uint8)
            for oid, (x1, y1, x2, y2) in _pvsg_boxes(t).items():
                mask[y1:y2, x1:x2] = oid
            _png(data / "vidor" / "masks" / VID / f"{t:04d}.png", mask, "L")
    return data


PVSG_OPTS = {"gap": 5, "clip_frames": 10}


@pytest.fixture(scope="module")
def pvsg_root(tmp_path_factory):
    return make_pvsg(tmp_path_factory.mktemp("pvsg"))


def test_pvsg_loader_pairs_first_frame_with_a_later_clip(pvsg_root):
    (pair,), skipped = pvsg.load_pairs(pvsg_root, pvsg.Options(**PVSG_OPTS))
    assert not skipped and pair.id == f"pvsg-{VID}-0005"
    assert {o.label for o in pair.image.objects} == {"adult", "child", "cake", "cup"}  # stuff (wall) left out
    assert {o.label for o in pair.other.objects} == {"adult", "child", "cake", "candle"}
    assert sorted((lk.image, lk.other) for lk in pair.links) == [("2", "2"), ("3", "3"), ("4", "4")]
    assert {(r.subject, r.predicate, r.object) for r in pair.image.relations} == {
        ("2", "holding", "3"),
        ("2", "looking at", "4"),
    }
    spans = {(r.subject, r.predicate, r.object): r.spans for r in pair.other.relations}
    assert spans[("3", "looking at", "4")] == [(7 / 9, 1.0)] and ("2", "flying", "3") not in spans
    child = pair.other.find("3")
    assert pair.image.find("3").box == (30, 30, 45, 50) and child.box == (45, 30, 60, 50)  # frame 5, mask bbox
    assert child.box_end == (72, 30, 87, 50)  # frame 14, the clip's last frame
    assert pair.media.image.endswith(f"{VID}/0000.png") and len(pair.media.frames) == 10
    assert pair.media.frames[0].endswith("0005.png")


def test_pvsg_without_masks_uses_relation_spans(tmp_path):
    root = make_pvsg(tmp_path, masks=False)
    (pair,), _ = pvsg.load_pairs(root, pvsg.Options(**PVSG_OPTS))
    assert {o.id for o in pair.image.objects} == {"2", "3", "4"} and all(o.box is None for o in pair.image.objects)


@pytest.mark.parametrize(
    "record, message",
    [
        (_pvsg_record(relations=[[2, 3, "holding", [0, 19]]]), f"(record {VID}): field 'relations.0.3.0'"),
        (_pvsg_record(meta={"width": W}), f"(record {VID}): field 'meta.num_frames': Field required"),
    ],
)
def test_pvsg_bad_records_name_file_record_and_field(tmp_path, record, message):
    root = make_pvsg(tmp_path, record)
    with pytest.raises(LayoutError, match="pvsg.json") as err:
        build_csqa(BuildSpec(source="pvsg", path=str(root), options=PVSG_OPTS), tmp_path / "out")
    assert message in str(err.value) and "expected the video records of PVSG" in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing written


def test_pvsg_of_another_layout_is_refused(tmp_path):
    (tmp_path / "pvsg.json").write_text(json.dumps({"videos": []}))  # e.g. a VidOR-style file
    with pytest.raises(LayoutError, match=r"pvsg.json: field 'objects': Field required \(expected PVSG's keys"):
        pvsg.load_pairs(tmp_path, pvsg.Options())


# ---------------------------------------------------------------- Action Genome: annotations/*.pkl + frames/
AG_VIDEO, AG_FRAMES = "001YG.mp4", [10, 20, 30, 40, 50, 60, 70, 80]


def _ag_object(cls, bbox, visible=True, att=None, spa=None, con=None, frame=10):
    return {
        "class": cls,
        "bbox": bbox if visible else None,
        "attention_relationship": att if visible else None,
        "spatial_relationship": spa if visible else None,
        "contacting_relationship": con if visible else None,
        "metadata": {"tag": f"{AG_VIDEO}/{cls.replace('/', '_')}/{frame:06d}", "set": "train"},
        "visible": visible,
    }


def _ag_annotations():
    objects, persons = {}, {}
    for t in AG_FRAMES:
        key = f"{AG_VIDEO}/{t:06d}.png"
        holding = t <= 50
        objects[key] = [
            _ag_object(
                "cup/glass/bottle",
                (40.0 + t / 10, 30.0, 10.0, 12.0),
                True,
                ["looking_at"],
                ["in_front_of"],
                ["holding"] if holding else ["not_contacting"],
                t,
            ),
            _ag_object("dish", (70.0, 60.0, 20.0, 8.0), t == 10, ["not_looking_at"], ["beneath"], ["touching"], t),
            _ag_object(
                "phone/camera", (90.0, 10.0, 8.0, 8.0), t >= 60, ["looking_at"], ["in_front_of"], ["holding"], t
            ),
        ]
        persons[key] = {
            "bbox": np.array([[1.0, 2.0, 30.0, 80.0], [5.0, 5.0, 35.0, 82.0]], dtype=np.float32),
            "bbox_score": np.array([0.3, 0.99], dtype=np.float32),
            "bbox_size": (W, H),
            "bbox_mode": "xyxy",
            "keypoints": np.zeros((2, 17, 3), dtype=np.float32),
            "keypoints_logits": np.zeros((2, 17), dtype=np.float32),
        }
    return objects, persons


def make_ag(root: Path, objects=None, persons=None) -> Path:
    ag = root / "ag"
    (ag / "annotations").mkdir(parents=True)
    default_objects, default_persons = _ag_annotations()
    for name, data in (("object_bbox_and_relationship.pkl", objects), ("person_bbox.pkl", persons)):
        data = data if data is not None else (default_objects if name.startswith("object") else default_persons)
        (ag / "annotations" / name).write_bytes(pickle.dumps(data, protocol=4))
    (ag / "annotations" / "frame_list.txt").write_text("".join(f"{k}\n" for k in default_objects))
    for t in AG_FRAMES:
        _png(ag / "frames" / AG_VIDEO / f"{t:06d}.png", _rgb(100 + t))
    return ag


@pytest.fixture(scope="module")
def ag_root(tmp_path_factory):
    return make_ag(tmp_path_factory.mktemp("ag"))


def test_action_genome_loader(ag_root):
    (pair,), _ = action_genome.load_pairs(ag_root, action_genome.Options())
    assert pair.id == "ag-001YG" and pair.image.size == (W, H)
    assert {o.id for o in pair.image.objects} == {"person", "cup/glass/bottle", "dish"}
    assert {o.id for o in pair.other.objects} == {"person", "cup/glass/bottle", "phone/camera"}  # dish unseen
    assert pair.image.find("person").box == (5.0, 5.0, 35.0, 82.0)  # the highest-scoring person box
    assert pair.image.find("cup/glass/bottle").box == (41.0, 30.0, 51.0, 42.0)  # xywh -> xyxy
    rels = {(r.predicate, r.object): (r.kind, r.spans) for r in pair.other.relations}
    assert rels[("holding", "cup/glass/bottle")] == ("contacting", [(0.0, 0.25)])  # clip = frames 40..80
    assert rels[("not_contacting", "cup/glass/bottle")] == ("contacting", [(0.5, 1.0)])
    assert pair.media.frames[0].endswith(f"{AG_VIDEO}/000040.png") and len(pair.media.frames) == 5
    assert {(lk.image, lk.other) for lk in pair.links} == {("person", "person"), ("cup/glass/bottle",) * 2}


def test_action_genome_bad_record_names_key_and_field(tmp_path):
    objects, _ = _ag_annotations()
    key = f"{AG_VIDEO}/000030.png"
    del objects[key][0]["visible"]
    root = make_ag(tmp_path, objects=objects)
    with pytest.raises(
        LayoutError, match=rf"object_bbox_and_relationship.pkl \(record {key}\): field 'objects.0.visible'"
    ):
        action_genome.load_pairs(root, action_genome.Options())
    root2 = make_ag(tmp_path / "b", objects={"001YG/10.jpg": []})
    with pytest.raises(LayoutError, match="keys must read 'VIDEO.mp4/FRAME.png'"):
        action_genome.load_pairs(root2, action_genome.Options())


class _Hostile:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_code_and_reads_numpy(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "object_bbox_and_relationship.pkl"
    bad.write_bytes(pickle.dumps({"x.mp4/000001.png": [_Hostile(marker)]}))
    with pytest.raises(UnsafePickleError, match=r"refusing to load global (posix|os)\.system"):
        load_pickle(bad)
    assert not marker.exists()
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        load_pickle(_write(tmp_path / "eval.pkl", b"cbuiltins\neval\n(S'1+1'\ntR."))
    # numpy arrays and scalars, under numpy 2 names and (as the released files were written) numpy 1 names
    data = {"bbox": np.arange(8, dtype=np.float32).reshape(2, 4), "s": np.float32(0.5), "size": (480, 270)}
    for proto in (2, 4):
        raw = pickle.dumps(data, protocol=proto)
        blobs = [raw]
        if proto == 2:  # GLOBAL opcodes hold the names as text lines: rename them as numpy 1 wrote them
            blobs.append(raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
            assert blobs[1] != raw
        for blob in blobs:
            out = load_pickle(_write(tmp_path / f"p{proto}.pkl", blob))
            assert out["bbox"].dtype == np.float32 and out["bbox"].tolist() == data["bbox"].tolist()
            assert out["s"] == np.float32(0.5) and out["size"] == (480, 270)


def _write(path: Path, blob: bytes) -> Path:
    path.write_bytes(blob)
    return path


def test_hostile_annotation_pickle_stops_the_build(tmp_path):
    root = make_ag(tmp_path)
    (root / "annotations" / "person_bbox.pkl").write_bytes(pickle.dumps(_Hostile(tmp_path / "pwned")))
    result = CliRunner().invoke(app, ["csqa", "build", "action-genome", str(root), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "person_bbox.pkl: refusing to load global" in result.output
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 3DSSG + 3RScan: objects.json, relationships.json, scans
SCAN = "754e884c-ea24-2175-8b34-cead19d4198d"
OBJECTS = [  # id, label, centroid (world = the camera frame of every view: identity poses), axes lengths
    ("1", "floor", (0.0, 1.0, 3.0), (4.0, 0.1, 4.0)),
    ("2", "chair", (0.5, 0.0, 3.0), (0.5, 0.8, 0.5)),
    ("3", "table", (-0.5, 0.0, 3.0), (0.8, 0.6, 0.8)),
    ("4", "lamp", (0.0, 0.0, -3.0), (0.3, 0.3, 0.3)),  # behind the camera
    ("5", "sofa", (0.0, 0.0, 6.0), (1.0, 0.8, 1.0)),  # behind the 4 m wall of the depth map: occluded
]


def make_3dssg(root: Path, frames: int = 6, sequence: bool = True) -> tuple[Path, Path]:
    graphs, scans = root / "3DSSG", root / "3RScan"
    graphs.mkdir(parents=True)
    objects = [
        {
            "id": oid,
            "global_id": str(10 + int(oid)),
            "label": label,
            "ply_color": "#aec7e8",
            "attributes": {"color": ["brown"]} if label == "table" else {},
        }
        for oid, label, _, _ in OBJECTS
    ]
    (graphs / "objects.json").write_text(json.dumps({"scans": [{"scan": SCAN, "objects": objects}]}))
    rels = [[2, 1, 1, "standing on"], [3, 1, 1, "standing on"], [2, 3, 3, "close by"], [3, 4, 7, "attached to"]]
    labels = {oid: label for oid, label, _, _ in OBJECTS}
    split = [
        {"scan": SCAN, "split": 0, "objects": labels, "relationships": rels[:2]},
        {"scan": SCAN, "split": 1, "objects": labels, "relationships": rels[1:]},
    ]
    (graphs / "relationships.json").write_text(json.dumps({"scans": split}))
    folder = scans / SCAN
    folder.mkdir(parents=True)
    groups = [
        {
            "id": int(oid),
            "objectId": int(oid),
            "label": label,
            "segments": [1, 2],
            "obb": {"centroid": list(c), "axesLengths": list(a), "normalizedAxes": [1, 0, 0, 0, 1, 0, 0, 0, 1]},
        }
        for oid, label, c, a in OBJECTS
    ]
    (folder / "semseg.v2.json").write_text(json.dumps({"scan_id": SCAN, "segGroups": groups}))
    if sequence:
        seq = folder / "sequence"
        seq.mkdir()
        k = "50 0 56 0 0 50 42 0 0 0 1 0 0 0 0 1"
        info = [
            "m_versionNumber = 4",
            "m_sensorName = Tango",
            f"m_colorWidth = {W}",
            f"m_colorHeight = {H}",
            "m_depthWidth = 56",
            "m_depthHeight = 42",
            "m_depthShift = 1000",
            f"m_calibrationColorIntrinsic = {k}",
            f"m_calibrationDepthIntrinsic = {k}",
            "m_calibrationColorExtrinsic = 1 0 0 0 0 1 0 0 0 0 1 0 0 0 0 1",
            f"m_frames.size = {frames}",
        ]
        (seq / "_info.txt").write_text("\n".join(info) + "\n")
        for i in range(frames):
            _png(seq / f"frame-{i:06d}.color.jpg", _rgb(200 + i))
            Image.fromarray(np.full((42, 56), 4000, np.uint16)).save(seq / f"frame-{i:06d}.depth.pgm")
            np.savetxt(seq / f"frame-{i:06d}.pose.txt", np.eye(4))
    else:
        (folder / "sequence.zip").write_bytes(b"PK")
    return graphs, scans


@pytest.fixture(scope="module")
def ssg_root(tmp_path_factory):
    return make_3dssg(tmp_path_factory.mktemp("3dssg"))


SSG_OPTS = {"views": 4}


def test_3dssg_loader_projects_objects_into_the_view(ssg_root):
    graphs, scans = ssg_root
    (pair,), _ = threedssg.load_pairs(scans, threedssg.Options(graphs=str(graphs), **SSG_OPTS))
    assert pair.id == f"3dssg-{SCAN}-frame-000002" and pair.other.modality == "3d"
    assert {o.label for o in pair.other.objects} == {"chair", "table", "lamp", "sofa"}  # floor left out
    shown = {o.label: o for o in pair.image.objects}
    assert set(shown) == {"chair", "table"}  # lamp behind the camera, sofa occluded by the depth map
    assert shown["chair"].depth == pytest.approx(3.0) and shown["table"].attributes == ["brown"]
    u = 50 * 0.5 / 3 + 56  # the chair's centre projects at u = fx * x / z + cx
    x1, _, x2, _ = shown["chair"].box
    assert x1 < u < x2 and shown["table"].box[2] < u
    assert {(r.subject, r.predicate, r.object) for r in pair.other.relations} == {
        ("2", "close by", "3"),
        ("3", "attached to", "4"),
    }  # the two relationships.json entries of the scan merged; relations to the floor left out
    assert [(r.subject, r.object) for r in pair.image.relations] == [("2", "3")]  # inherited: both in the image
    assert len(pair.media.views) == 4 and all("000002" not in v.color for v in pair.media.views)


def test_3dssg_needs_the_unpacked_sequence(tmp_path):
    graphs, scans = make_3dssg(tmp_path, sequence=False)
    with pytest.raises(
        LayoutError, match=rf"{SCAN}/sequence \(record {SCAN}\): not found: unpack the scan's sequence.zip"
    ):
        threedssg.load_pairs(scans, threedssg.Options(graphs=str(graphs), **SSG_OPTS))


def test_3dssg_relationships_of_another_layout(tmp_path):
    graphs, scans = make_3dssg(tmp_path)
    (graphs / "relationships.json").write_text(json.dumps({"scans": [{"scan": SCAN, "relationships": [[2, 1, "on"]]}]}))
    with pytest.raises(
        LayoutError,
        match=rf"relationships.json \(record {SCAN}\): field 'relationships.0.2'.*expected relationships as \[subject_id, object_id, predicate_id, predicate\]",
    ):
        threedssg.load_pairs(scans, threedssg.Options(graphs=str(graphs)))


# ---------------------------------------------------------------- rules and templates
def _qas(pair, templates=None):
    return {
        (c.family, c.question): c.answer
        for c in rule_qas(pair, templates or load_templates(), np.random.default_rng(0))
    }


def test_rules_on_a_video_pair(pvsg_root):
    (pair,), _ = pvsg.load_pairs(pvsg_root, pvsg.Options(**PVSG_OPTS))
    qas = _qas(pair)
    assert qas[("appearance", "The cup is in the image. Can it still be seen in the video?")] == "no"
    assert qas[("new_object", "Which object shows up in the video but is not in the image?")] == "candle"
    moves = {"child": ("further right", "right")}  # the others stay in place
    for (family, question), answer in qas.items():
        if family in ("position", "motion"):
            label = question.split(" the ")[1].split()[0]
            want = moves.get(label, ("in the same place", "it stays in place"))[family == "motion"]
            assert answer == want, question
    assert sum(f in ("position", "motion") for f, _ in qas) == 2
    assert (
        qas[("relation_appears", "When in the video does the relation 'child looking at cake' begin?")]
        == "near the end"
    )
    assert (
        qas[("relation_new", "In the video, the adult is picking something that is not in the image. What is it?")]
        == "candle"
    )
    persists = {q.split(", ")[1].split(".")[0]: a for (f, q), a in qas.items() if f == "relation_persists"}
    assert persists == {"the adult is holding the child": "yes", "the adult is looking at the cake": "no"}
    evolves = (
        "In the image, the adult is holding the child. How is the adult related to the child at the end of the video?"
    )
    assert qas[("relation_evolves", evolves)] == "holding and hugging"
    assert {c.origin for c in rule_qas(pair, load_templates(), np.random.default_rng(0))} == {"rules"}


def test_rules_on_an_image_3d_pair(ssg_root):
    graphs, scans = ssg_root
    (pair,), _ = threedssg.load_pairs(scans, threedssg.Options(graphs=str(graphs), **SSG_OPTS))
    qas = _qas(pair)
    assert qas[("position", "In the image, is the chair to the left or to the right of the table?")] == "right"
    assert qas[("new_object", "How many objects of the room cannot be seen in the image?")] == "2"
    new = "In the room, the table is attached to something that the image does not show. What is it?"
    assert qas[("relation_new", new)] == "lamp"


def test_templates_from_yaml_change_the_questions_and_are_checked(tmp_path, pvsg_root):
    (pair,), _ = pvsg.load_pairs(pvsg_root, pvsg.Options(**PVSG_OPTS))
    good = tmp_path / "t.yaml"
    good.write_text("rules:\n  new_object_video: 'What is new in the clip?'\nwords:\n  yes: 'yep'\n")
    qas = _qas(pair, load_templates(good))
    assert qas[("new_object", "What is new in the clip?")] == "candle"
    assert "yep" in qas.values() and "yes" not in qas.values()
    for text, message in [
        ("rules:\n  motion: 'Where does it go?'\n", r"rules.motion: uses fields \[\], expected exactly \['a'\]"),
        ("rules:\n  no_such: 'x'\n", "rules.no_such: unknown rule template"),
        ("verifier: 'Q: {question} {image_graph}'\n", "verifier: uses fields"),
        ("qas_per_prompt: 0\n", "qas_per_prompt"),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_templates(bad)
    assert "Image scene graph" in prompt(pair, "object", load_templates(), ["appearance", "relation_new"])


# ---------------------------------------------------------------- generator replies, dedupe, balance
def test_parse_reply_keeps_valid_items_and_drops_the_rest_with_reasons():
    reply = """Here you are:
```json
{"qas": [{"family": "appearance", "question": "Is the cup still there in the video?", "answer": "no"},
         {"family": "relation_new", "question": "What new thing does the adult hold?", "answer": "cake"},
         {"family": "appearance", "question": "Why?", "answer": "no"},
         {"family": "motion", "question": "Where does the child go in the video?", "answer": "left", "x": 1}]}
```"""
    kept, drops = parse_reply("p", reply, "object", ["appearance", "motion", "relation_new"], "gen")
    assert [(c.family, c.answer, c.origin) for c in kept] == [("appearance", "no", "gen")]
    assert [d.reason for d in drops] == [
        "family of the relation level in a object-level reply",
        "QA fails the schema",
        "QA fails the schema",
    ]
    assert "question" in drops[1].detail["error"] and "x" in drops[2].detail["error"]
    for text, reason in [
        ("sure!", "no JSON object in the reply"),
        ('{"qas": [}', "invalid JSON"),
        ('{"items": []}', "reply is not {'qas': [...]}"),
    ]:
        assert [d.reason for d in parse_reply("p", text, "object", ["appearance"], "gen")[1]] == [reason]


def test_normalise_and_match():
    assert normalise("The  Cup/Glass, two!") == "cup glass 2"
    assert answers_match("Yes, it is.", "yes") and answers_match("the candle", "Candle")
    assert not answers_match("not sure", "no") and not answers_match("", "no")


def test_balance_takes_families_in_turn():
    cands = [Candidate("p", "appearance", f"q{i}", "a", "rules") for i in range(10)]
    cands += [Candidate("p", "motion", f"m{i}", "a", "rules") for i in range(2)]
    kept, drops = balance(cands, 6, seed=0)
    assert sorted(c.family for c in kept) == ["appearance"] * 4 + ["motion"] * 2
    assert len(drops) == 6 and {d.reason for d in drops} == {"over the target (balanced over families)"}
    assert [c.question for c in balance(cands, 6, seed=0)[0]] == [c.question for c in kept]  # seeded


# ---------------------------------------------------------------- builds: output, report, media, layouts
def _read_out(out: Path):
    samples = [parse_sample(r) for r in read_records(out / "data.jsonl")]
    return samples, json.loads((out / "report.json").read_text())


def test_rules_build_writes_samples_that_moekit_reads(tmp_path, pvsg_root):
    spec = BuildSpec(source="pvsg", path=str(pvsg_root), options=PVSG_OPTS, target=6, seed=1)
    report = build_csqa(spec, tmp_path / "out")
    samples, on_disk = _read_out(tmp_path / "out")
    assert report == on_disk and report["kept"] == len(samples) == 6 and report["pairs"] == 1
    assert len({s.task for s in samples}) == 6  # balanced: one per family while families last
    fam = report["families"]
    assert sum(v["kept"] for v in fam.values()) == 6
    assert sum(v["generated"] for v in fam.values()) == report["generated"] > 6
    assert report["dropped"]["balance"]["over the target (balanced over families)"] == report["generated"] - 6
    s = samples[0]
    assert s.modality == "video" and s.meta["origin"] == "rules" and s.meta["verified"] is False
    assert s.conversations[0].value.startswith("<image>\n<video>\n")
    dataset = ConversationDataset(
        DatasetSpec(name="csqa", path=str(tmp_path / "out" / "data.jsonl")),
        DataConfig(datasets=[DatasetSpec(name="csqa", path="x")]),
        None,
    )
    media = load_media(dataset.entries[0].sample, dataset.root, FramesSpec())
    assert len(media.images) == 1 and len(media.clip) == 10  # the clip's frames, through the links
    assert (tmp_path / "out" / "media" / f"pvsg-{VID}-0005" / "clip" / "0000.png").is_symlink()
    dropped = [json.loads(line) for line in (tmp_path / "out" / "dropped.jsonl").read_text().splitlines()]
    assert len(dropped) == report["generated"] - 6 and {d["stage"] for d in dropped} == {"balance"}
    provenance = json.loads((tmp_path / "out" / "moekit.json").read_text())
    assert provenance["made_by"] == "moekit csqa build" and provenance["params"]["spec"]["target"] == 6
    again = build_csqa(spec, tmp_path / "again")
    assert (tmp_path / "again" / "data.jsonl").read_text() == (tmp_path / "out" / "data.jsonl").read_text()
    assert again == report


def test_build_3d_pairs_with_paired_layout_and_copies(tmp_path, ssg_root):
    graphs, scans = ssg_root
    spec = BuildSpec(
        source="3dssg", path=str(scans), options={**SSG_OPTS, "graphs": str(graphs)}, layout="paired", media="copy"
    )
    build_csqa(spec, tmp_path / "out")
    samples, report = _read_out(tmp_path / "out")
    assert samples and all(s.paired.scene and s.clip is None for s in samples)
    assert (
        samples[0].conversations[0].value.startswith("<image>\n") and "<video>" not in samples[0].conversations[0].value
    )
    from moekit.data.scene import read_scene

    scene = read_scene(tmp_path / "out" / samples[0].paired.scene, FramesSpec())
    assert len(scene.frames) == 4 and scene.depth[0].max() == pytest.approx(4.0) and scene.depth.shape[1:] == (H, W)
    assert not (tmp_path / "out" / samples[0].image).is_symlink()


def test_dedupe_per_pair_or_global(tmp_path, ag_root):
    def gen(prompts):
        qa = {"family": "appearance", "question": "Is the person still in the video?", "answer": "yes"}
        other = {**qa, "question": "is THE person still in the video"}  # the same once normalised
        return [json.dumps({"qas": [qa, other]}) if "single objects" in p else '{"qas": []}' for p in prompts]

    spec = BuildSpec(source="action-genome", path=str(ag_root), generator="fake-gen")
    report = build_csqa(spec, tmp_path / "out", generator=gen)
    assert report["kept"] == 1 and report["dropped"]["dedupe"] == {"duplicate question": 1}
    assert report["dropped"]["generate"] == {"reply is not {'qas': [...]}": 1}  # the empty relation-level reply
    assert _read_out(tmp_path / "out")[0][0].meta["origin"] == "fake-gen"


# ---------------------------------------------------------------- the real tiny VLM as generator and verifier
def test_tiny_model_generator_output_is_dropped_as_invalid_json(tmp_path, ag_root, bundle):
    spec = BuildSpec(source="action-genome", path=str(ag_root), generator=str(bundle), max_new_tokens=6)
    report = build_csqa(spec, tmp_path / "out")
    assert report["kept"] == 0 and (tmp_path / "out" / "data.jsonl").read_text() == ""
    assert report["dropped"]["generate"] == {"no JSON object in the reply": 2}  # one reply per level
    dropped = [json.loads(line) for line in (tmp_path / "out" / "dropped.jsonl").read_text().splitlines()]
    assert all(d["stage"] == "generate" and isinstance(d["reply"], str) for d in dropped)
    assert not (tmp_path / "out" / "media").exists() or not any((tmp_path / "out" / "media").iterdir())


def test_tiny_model_verifier_keeps_only_matching_answers(tmp_path, ag_root, bundle):
    (pair,), _ = action_genome.load_pairs(ag_root, action_genome.Options())
    question = "Is the person from the image still in the video?"
    scratch = tmp_path / "scratch"
    paths = {k: scratch / v for k, v in write_media(pair, scratch, "link").items()}
    item = VerifyItem(verify_prompt(pair, question, load_templates()), paths["image"], paths["video"])
    (own,) = model_verifier(bundle, max_new_tokens=4)([item])  # what the verifier itself answers
    assert normalise(own)

    def gen(prompts):
        qas = [
            {"family": "appearance", "question": question, "answer": own},
            {"family": "new_object", "question": "Which object is new in the video?", "answer": "zebra crossing"},
        ]
        return [json.dumps({"qas": qas}) if "single objects" in p else '{"qas": []}' for p in prompts]

    spec = BuildSpec(
        source="action-genome", path=str(ag_root), generator="gen", verifier=str(bundle), verifier_tokens=4
    )
    report = build_csqa(spec, tmp_path / "out", generator=gen)
    (sample,), _ = _read_out(tmp_path / "out")
    assert sample.task == "appearance" and sample.meta["verified"] is True and sample.meta["verifier_answer"] == own
    assert report["dropped"]["verify"] == {"verifier answered differently": 1}
    assert report["families"]["new_object"]["dropped"] == {"verifier answered differently": 1}


# ---------------------------------------------------------------- the command line
def test_cli_build_end_to_end_and_errors(tmp_path, ag_root):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "csqa",
            "build",
            "action-genome",
            str(ag_root),
            "-o",
            str(out),
            "--target",
            "4",
            "--option",
            "gap=1",
            "--family",
            "appearance",
            "--family",
            "relation_persists",
        ],
    )
    assert result.exit_code == 0, result.output
    samples, report = _read_out(out)
    assert result.output.startswith(f"{len(samples)} QA samples from 1 pairs")
    assert {s.task for s in samples} <= {"appearance", "relation_persists"} and report["kept"] == len(samples) > 0
    assert "appearance" in result.output
    again = CliRunner().invoke(app, ["csqa", "build", "action-genome", str(ag_root), "-o", str(out)])
    assert again.exit_code == 1 and "pass --overwrite" in again.output
    bad = CliRunner().invoke(app, ["csqa", "build", "vidor", str(ag_root), "-o", str(tmp_path / "o2")])
    assert bad.exit_code == 1 and "source" in bad.output and "pvsg" in bad.output
    bad = CliRunner().invoke(
        app, ["csqa", "build", "action-genome", str(ag_root), "-o", str(tmp_path / "o3"), "--option", "gapp=1"]
    )
    assert bad.exit_code == 1 and "gapp" in bad.output and not (tmp_path / "o3").exists()
    shown = CliRunner().invoke(app, ["csqa", "templates"])
    assert shown.exit_code == 0 and "relation_persists_video:" in shown.output
    (tmp_path / "t.yaml").write_text(shown.output)  # the printed defaults read back as the defaults
    assert load_templates(tmp_path / "t.yaml") == load_templates()
