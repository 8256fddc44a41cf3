"""Chat formatting and answer-only labels.

The conversation is rendered with the tokenizer's chat template when it has one, else with moekit's plain
template (below). Every assistant answer (its text plus the template's end-of-turn marker) is found by rendering
the conversation incrementally, so labels are -100 everywhere except on answer tokens: cross-entropy trains the
answers only. `<image>` / `<video>` placeholders are cut out of the rendered text and replaced by the token ids
the vision preprocessing gives for each medium.

moekit's plain template, used when a tokenizer has none:

    System: {system}\\n            (only when the sample has a system turn)
    User: {question}\\n
    Assistant: {answer}{eos}\\n
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from moekit.data.schema import IMAGE_TAG, VIDEO_TAG

IGNORE = -100
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
_PLACEHOLDER = re.compile(f"({re.escape(IMAGE_TAG)}|{re.escape(VIDEO_TAG)})")


def plain_template(messages: Sequence[dict], add_generation_prompt: bool, eos: str) -> str:
    """moekit's fallback chat template (documented in the module docstring)."""
    out = []
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "assistant":
            out.append(f"Assistant: {content}{eos}\n")
        else:
            out.append(f"{role.capitalize()}: {content}\n")
    if add_generation_prompt:
        out.append("Assistant:")
    return "".join(out)


@dataclass
class Piece:
    """A run of the prompt: text (trained on when `answer`) or a media placeholder to fill."""

    text: str
    answer: bool = False
    media: str | None = None  # IMAGE_TAG or VIDEO_TAG


class ChatFormatter:
    """Renders conversations with a tokenizer's chat template (or the plain one) and marks the answer spans."""

    def __init__(self, tokenizer, use_template: bool | None = None):
        self.tokenizer = tokenizer
        has_template = bool(getattr(tokenizer, "chat_template", None))
        self.use_template = has_template if use_template is None else use_template
        if self.use_template and not has_template:
            raise ValueError("the tokenizer has no chat_template; leave use_template unset to use the plain one")

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        if not self.use_template:
            return plain_template(messages, add_generation_prompt, self.tokenizer.eos_token or "")
        return self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def pieces(self, roles: Sequence[str], texts: Sequence[str]) -> list[Piece]:
        """Split the rendered conversation into prompt text, answer text and media placeholders."""
        messages = [{"role": ROLES[r], "content": t} for r, t in zip(roles, texts)]
        full = self.render(messages)
        spans = []
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:k], add_generation_prompt=True)
            upto = self.render(messages[: k + 1])
            if not (upto.startswith(prompt) and full.startswith(upto)):
                raise ValueError(
                    "the chat template does not render conversations incrementally (a prefix of the conversation "
                    "does not render to a prefix of the text), so answer tokens cannot be located"
                )
            end = len(upto.rstrip())
            start = len(prompt) + (len(upto[len(prompt) :]) - len(upto[len(prompt) :].lstrip()))
            spans.append((start, end))
        out: list[Piece] = []
        cursor = 0
        for start, end in spans:
            out.extend(_split_media(full[cursor:start]))
            out.append(Piece(full[start:end], answer=True))
            cursor = end
        out.extend(_split_media(full[cursor:]))
        return [p for p in out if p.text or p.media]

    def prompt_pieces(self, roles: Sequence[str], texts: Sequence[str]) -> list[Piece]:
        """The conversation (ending on a user turn) rendered up to the assistant's turn, split at media
        placeholders: what a model is given to generate the next answer."""
        messages = [{"role": ROLES[r], "content": t} for r, t in zip(roles, texts)]
        if not messages or messages[-1]["role"] != "user":
            raise ValueError("a generation prompt must end with a user (human) turn")
        return [p for p in _split_media(self.render(messages, add_generation_prompt=True)) if p.text or p.media]

    def token_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _split_media(text: str) -> list[Piece]:
    parts = _PLACEHOLDER.split(text)
    return [Piece("", media=p) if p in (IMAGE_TAG, VIDEO_TAG) else Piece(p) for p in parts if p]


def assemble(
    formatter: ChatFormatter, pieces: Sequence[Piece], media: dict[str, list[list[int]]]
) -> tuple[list[int], list[int]]:
    """Token ids and labels; the k-th `<image>` gets `media["<image>"][k]`, `<video>` gets `media["<video>"][0]`."""
    ids: list[int] = []
    labels: list[int] = []
    queues = {tag: list(segments) for tag, segments in media.items()}
    for piece in pieces:
        if piece.media is not None:
            queue = queues.get(piece.media) or []
            if not queue:
                raise ValueError(f"more {piece.media} placeholders than media")
            segment = queue.pop(0)
            ids += segment
            labels += [IGNORE] * len(segment)
            continue
        tokens = formatter.token_ids(piece.text)
        ids += tokens
        labels += tokens if piece.answer else [IGNORE] * len(tokens)
    left = {tag: len(q) for tag, q in queues.items() if q}
    if left:
        raise ValueError(f"media without a placeholder: {left}")
    return ids, labels
