"""Helpers the task yamls name as `!function moekit_lmms.task_utils.<name>`."""

from __future__ import annotations


def decode_images(dataset):
    """process_docs: decode `image` to PIL even when the parquet lacks the HF features metadata (a parquet written
    by pyarrow stores the HF Image struct {bytes, path}, which lmms-eval's doc_to_visual cannot .convert())."""
    import datasets

    if "image" in dataset.features and not isinstance(dataset.features["image"], datasets.Image):
        dataset = dataset.cast_column("image", datasets.Image())
    return dataset
