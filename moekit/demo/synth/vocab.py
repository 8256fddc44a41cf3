"""Every word the synthetic data can contain: the fillers and the question / answer templates.

The tiny bundle's word-level tokenizer is built from `vocabulary()`, so a test checks that no synthetic text
maps to the unknown token.
"""

from __future__ import annotations

import re

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 190),
    "orange": (240, 140, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "white": (235, 235, 235),
}
SHAPES_2D = ("circle", "square", "triangle")
SHAPES_3D = ("box", "ball")
NUMBERS = ("zero", "one", "two", "three", "four", "five")
DIRECTIONS = ("left", "right", "up", "down")
YES_NO = ("yes", "no")

# Question / answer templates; {fields} are filled with the words above. Kept here so the vocabulary is complete.
TEMPLATES: dict[str, str] = {
    "colour_q": "What colour is the {shape} ?",
    "shape_q": "What shape is {colour} ?",
    "count_q": "How many shapes are there ?",
    "exists_q": "Is there a {colour} {shape} ?",
    "background_q": "What colour is the background ?",
    "describe_image_q": "Describe the image .",
    "describe_video_q": "Describe the video .",
    "describe_scene_q": "Describe the room .",
    "motion_q": "Which way does the {colour} {shape} move ?",
    "moving_colour_q": "What colour is the moving shape ?",
    "scene_count_q": "How many objects are in the room ?",
    "scene_colour_q": "What colour is the {shape} in the room ?",
    "nearer_q": "Which object is nearer to the camera , the {a} or the {b} ?",
    "side_q": "Is the {a} left or right of the {b} in the image ?",
    "appears_q": "Which object appears in the video but not in the image ?",
    "gone_q": "Which object from the image is gone in the video ?",
    "moved_q": "Where does the {a} move in the video compared with the image ?",
    "still_q": "Is the {a} from the image still in the video ?",
    "new_count_q": "How many objects are in the video that were not in the image ?",
    "relation_q": "In the image the {a} is left of the {b} . Is it still left of the {b} at the end of the video ?",
    "hidden_q": "Which object of the room cannot be seen in the image ?",
    "image_count_q": "How many objects of the room can be seen in the image ?",
    "on_background": "on a {background} background .",
    "moves": "{a} moves {direction}",
    "in_room": "on the floor .",
    "the_and": "the a and",
    "chat_roles": "user assistant system",  # rendered by the bundle's chat template
}


def words_of(text: str) -> list[str]:
    """Split like the tokenizer's pre-tokenizer (`\\w+` runs and punctuation runs)."""
    return re.findall(r"\w+|[^\w\s]+", text)


def vocabulary() -> list[str]:
    """Sorted words of every template and filler."""
    words: set[str] = set()
    fillers = [*COLOURS, *BACKGROUNDS, *SHAPES_2D, *SHAPES_3D, *NUMBERS, *DIRECTIONS, *YES_NO]
    for text in [*TEMPLATES.values(), *fillers]:
        words.update(words_of(re.sub(r"\{\w+\}", " ", text)))
    return sorted(words)
