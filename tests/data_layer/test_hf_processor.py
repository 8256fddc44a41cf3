"""Families without moekit's own preprocessing go through their HF processor, built offline from the folder."""

import torch

from moekit.data.collate import Collator, split_batch
from moekit.data.config import FramesSpec
from moekit.data.media import load_media
from moekit.data.preprocess import Preprocessor
from moekit.data.schema import Sample


def test_llava_through_its_processor(tmp_path, synth_dir):
    from transformers import AutoModelForImageTextToText, CLIPImageProcessorPil, LlavaProcessor

    from moekit.demo.bundle import build_tokenizer
    from moekit.demo.synth.vocab import vocabulary
    from moekit.demo.tiny import tiny_config

    tokenizer = build_tokenizer(vocabulary(), ["<image>"])
    config = tiny_config("llava")
    config.text_config.vocab_size = len(tokenizer)
    config.image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    model = AutoModelForImageTextToText.from_config(config).eval()
    images = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)

    pre = Preprocessor.from_dir(tmp_path)
    sample = Sample.model_validate(
        {
            "id": "x",
            "image": "media/images/img-00000.png",
            "conversations": [
                {"from": "human", "value": "What colour is the circle ?"},
                {"from": "gpt", "value": "red"},
            ],
        }
    )
    item = pre.encode(sample, load_media(sample, synth_dir, FramesSpec()), 256)
    image_id = config.image_token_index
    assert int((item["input_ids"] == image_id).sum()) == 4  # (28 / 14)^2 patches, CLS dropped
    assert item["pixel_values"].shape == (1, 3, 28, 28)
    assert pre.tokenizer.decode(item["labels"][item["labels"] != -100]) == "red <|im_end|>"
    inputs, _ = split_batch(Collator(pre.pad_id)([item, item]))
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).loss)
