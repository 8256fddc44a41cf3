import json

import pytest
import torch

from moekit.data.chat import IGNORE
from moekit.data.config import DataConfig
from moekit.data.loader import build_dataset, build_loader
from moekit.data.media import load_media
from moekit.data.schema import BadSample, Sample

GOOD = {
    "id": "ok-1",
    "image": "media/images/img-00000.png",
    "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the circle ?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "How many shapes are there ?"},
        {"from": "gpt", "value": "two"},
    ],
}


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _config(path, **kw):
    return DataConfig(datasets=[{"name": "d", "path": str(path), "media_root": kw.pop("root", None)}], **kw)


def test_labels_cover_only_the_answers(preprocessor, synth_dir):
    sample = Sample.model_validate(GOOD)
    item = preprocessor.encode(
        sample, load_media(sample, synth_dir, DataConfig.model_fields["frames"].default_factory()), 512
    )
    ids, labels = item["input_ids"], item["labels"]
    tok = preprocessor.tokenizer
    assert tok.decode(labels[labels != IGNORE]) == "red <|im_end|> two <|im_end|>"
    assert torch.equal(labels[labels != IGNORE], ids[labels != IGNORE])
    question = tok.convert_tokens_to_ids("colour")
    assert (labels[ids == question] == IGNORE).all() and (
        labels[ids == tok.convert_tokens_to_ids("<|image_pad|>")] == IGNORE
    ).all()
    # the image tokens match the pixels: 112x84 -> grid 6x8 -> 12 merged tokens
    assert int((ids == tok.convert_tokens_to_ids("<|image_pad|>")).sum()) == 12
    assert item["image_grid_thw"].tolist() == [[1, 6, 8]] and item["pixel_values"].shape == (48, 1176)
    assert torch.equal(item["mm_token_type_ids"], (ids == tok.convert_tokens_to_ids("<|image_pad|>")).long())


def test_plain_template_when_the_tokenizer_has_none(preprocessor):
    from moekit.data.chat import ChatFormatter, assemble

    tok = preprocessor.tokenizer
    saved, tok.chat_template = tok.chat_template, None
    try:
        formatter = ChatFormatter(tok)
        pieces = formatter.pieces(["human", "gpt"], ["What colour is the square ?", "blue"])
        assert "".join(p.text for p in pieces) == "User: What colour is the square ?\nAssistant: blue<|im_end|>\n"
        ids, labels = assemble(formatter, pieces, {})
        assert tok.decode([t for t in labels if t != IGNORE]) == "blue <|im_end|>"
    finally:
        tok.chat_template = saved


def test_schema_errors_name_file_line_and_id(tmp_path, preprocessor):
    rows = [
        GOOD,
        {"id": "no-answer", "conversations": [{"from": "human", "value": "hi"}]},
        {"id": "typo", "imgae": "x.png", "conversations": GOOD["conversations"]},
        "{not json",
        {
            "id": "two-images",
            "image": "a.png",
            "conversations": [{"from": "human", "value": "<image><image> ?"}, {"from": "gpt", "value": "x"}],
        },
        {"id": "order", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},
    ]
    path = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(BadSample) as info:
        build_dataset(_config(path), preprocessor)
    message = str(info.value)
    assert "5 bad sample(s)" in message
    assert f"{path}:2 (id 'no-answer')" in message and "conversations" in message
    assert f"{path}:3 (id 'typo')" in message and "imgae: unknown key" in message
    assert f"{path}:4: not valid JSON" in message
    assert f"{path}:5 (id 'two-images')" in message and "2 <image> placeholder(s) but 1" in message
    assert "(id 'order')" in message and "alternate" in message
    dataset = build_dataset(_config(path, bad_samples="skip"), preprocessor)
    assert [e.sample.id for e in dataset.parts[0].entries] == ["ok-1"] and len(dataset.parts[0].skipped) == 5


def test_bad_media_fail_or_skip_without_dying_mid_epoch(tmp_path, preprocessor, synth_dir):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = [
        {**GOOD, "id": "good-a"},
        {**GOOD, "id": "missing", "image": "media/images/nope.png"},
        {**GOOD, "id": "broken", "image": str(tmp_path / "broken.png")},
        {**GOOD, "id": "good-b"},
    ]
    path = _write(tmp_path / "media.jsonl", rows)
    loader = build_loader(_config(path, root=str(synth_dir)), preprocessor, split="eval", batch_size=2)
    assert len(loader.dataset.verify()) == 1  # the cheap stat check finds the missing file before training
    with pytest.raises(BadSample, match=r"media.jsonl:2 \(id 'missing'\): image .*nope.png not found"):
        list(loader)
    loader = build_loader(
        _config(path, root=str(synth_dir), bad_samples="skip"), preprocessor, split="eval", batch_size=2
    )
    batches = list(loader)
    ids = [i for b in batches for i in b["sample_ids"]]
    assert len(ids) == 4 and set(ids) == {"good-a", "good-b"}  # bad ones replaced by the next good sample
    skipped = loader.dataset.parts[0].skipped
    assert any("'missing'" in s for s in skipped) and any("'broken'" in s for s in skipped)


def test_media_that_do_not_fit_max_length(tmp_path, preprocessor, synth_dir):
    two = {**GOOD, "image": None, "images": [GOOD["image"]] * 2}
    two["conversations"] = [
        {"from": "human", "value": "<image> <image> Describe the image ."},
        {"from": "gpt", "value": "red"},
    ]
    path = _write(tmp_path / "long.jsonl", [GOOD, two])
    dataset = build_dataset(_config(path, root=str(synth_dir), max_length=16), preprocessor)
    with pytest.raises(BadSample, match="no answer tokens left within max_length=16"):
        dataset[0]  # 16 tokens hold the prompt and the image, not the answer
    with pytest.raises(BadSample, match=r"long.jsonl:2 .*media do not fit in max_length=16"):
        dataset[1]
    assert (
        len(
            dataset.parts[0].preprocessor.encode(
                dataset.parts[0].entries[1].sample,
                load_media(dataset.parts[0].entries[1].sample, synth_dir, dataset.parts[0].config.frames),
                40,
            )["input_ids"]
        )
        <= 40
    )
