"""The `moekit` model of lmms-eval: one moekit checkpoint answering lmms-eval's generation requests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image

from moekit.data.config import FramesSpec
from moekit.data.frames import read_video
from moekit.data.media import Media
from moekit.evaluate.generate import Request, Sampling, generate_batch
from moekit.evaluate.model_dir import open_model_dir


class Moekit(lmms):
    """`--model_args pretrained=DIR[,batch_size=N,max_frames=32,max_new_tokens=128,tokenizer=DIR]`."""

    def __init__(
        self,
        pretrained: str,
        batch_size: int | str = 1,
        max_frames: int | str = 32,
        max_new_tokens: int | str = 128,
        tokenizer: str | None = None,
        **_: Any,
    ) -> None:
        super().__init__()
        self.opened = open_model_dir(Path(pretrained), tokenizer)
        self.batch_size_per_gpu = int(batch_size)
        self.frames = FramesSpec(max_frames=int(max_frames))
        self.default_new_tokens = int(max_new_tokens)

    def _media(self, visuals: list[Any]) -> Media:
        images, clip = [], None
        for visual in visuals or []:
            if isinstance(visual, Image.Image):
                images.append(visual.convert("RGB"))
            elif isinstance(visual, (str, Path)) and clip is None:
                clip = read_video(Path(visual), self.frames)
            else:
                raise ValueError(f"moekit takes images and one video per request, not {type(visual).__name__}")
        return Media(images, clip, None, None)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        out = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id])
            sampling = Sampling(
                max_new_tokens=int(gen_kwargs.get("max_new_tokens") or self.default_new_tokens),
                temperature=float(gen_kwargs.get("temperature") or 0.0) if gen_kwargs.get("do_sample") else 0.0,
            )
            answer = generate_batch(self.opened, [Request(["human"], [context], self._media(visuals))], sampling)[0]
            for stop in gen_kwargs.get("until") or []:
                answer = answer.split(stop)[0] if stop else answer
            out.append(answer)
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("moekit's adapter generates; use `moekit eval choices` for likelihood ranking")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        return self.generate_until(requests)
