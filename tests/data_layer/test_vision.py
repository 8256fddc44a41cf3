import numpy as np
import pytest
import torch
from PIL import Image

from moekit.data.qwen_vision import QwenPixelConfig, image_patches, smart_resize, video_patches


@pytest.mark.parametrize("size", [(84, 112), (100, 37), (480, 640), (30, 30), (29, 301)])
def test_image_patches_match_stock_processor(size):
    from transformers import Qwen2VLImageProcessorPil

    cfg = QwenPixelConfig(max_pixels=28 * 28 * 40)
    stock = Qwen2VLImageProcessorPil(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    ref = stock(images=[image], return_tensors="pt")
    rows, grid = image_patches(image, cfg)
    assert ref["image_grid_thw"].tolist() == [list(grid)]
    assert torch.equal(ref["pixel_values"], rows)  # bit-exact


def test_patches_read_back_as_the_stock_config(tmp_path):
    """A preprocessor_config.json written by moekit configures the stock processor the same way."""
    import json

    from transformers import Qwen2VLImageProcessorPil

    cfg = QwenPixelConfig(min_pixels=56 * 56, max_pixels=112 * 112)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg.to_json()))
    assert QwenPixelConfig.from_dir(tmp_path) == cfg
    stock = Qwen2VLImageProcessorPil.from_pretrained(str(tmp_path))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 150, 3), dtype=np.uint8))
    assert torch.equal(stock(images=[image], return_tensors="pt")["pixel_values"], image_patches(image, cfg)[0])


def test_video_of_a_still_frame_equals_the_image():
    cfg = QwenPixelConfig(video_min_pixels=56 * 56, video_max_pixels=28 * 28 * 40, max_pixels=28 * 28 * 40)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (84, 112, 3), dtype=np.uint8))
    video, vgrid = video_patches([image, image], cfg)
    still, igrid = image_patches(image, cfg)
    assert vgrid == igrid and torch.equal(video, still)


def test_odd_frame_count_repeats_the_last_frame():
    cfg = QwenPixelConfig(video_min_pixels=56 * 56, video_max_pixels=56 * 56)
    frames = [Image.new("RGB", (56, 56), (10 * i, 0, 0)) for i in range(3)]
    rows, grid = video_patches(frames, cfg)
    assert grid == (2, 4, 4)
    last, _ = video_patches([frames[2], frames[2]], cfg)
    assert torch.equal(rows[16:], last)
    assert not torch.equal(rows[:16], last)


def test_smart_resize_bounds():
    for h, w in [(10, 10), (480, 640), (1000, 30), (3000, 4000)]:
        rh, rw = smart_resize(h, w, 28, 56 * 56, 28 * 28 * 100)
        assert rh % 28 == 0 and rw % 28 == 0
        assert 56 * 56 <= rh * rw <= 28 * 28 * 100
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 3000, 28, 56 * 56, 28 * 28 * 100)
