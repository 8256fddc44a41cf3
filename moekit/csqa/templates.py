"""The question families of PolyV's CSQA (Appendix B.1) and every text the builder writes or sends to a model.

Two levels: object-level families (appearance / disappearance, position change, motion, interaction, new
objects, state change) and relation-level families (a relation persists or changes, appears / disappears,
evolves, strengthens / weakens, is new in the video). `Templates` holds the generator prompts (one per level),
the verifier prompt, a note per family, the rule generator's question templates and its answer words. Every
text here was written for moekit. Change any of them with a YAML file (`--templates FILE`): its keys are merged
over the defaults (`moekit csqa templates` prints them) and checked: unknown keys and a template that lacks or
adds a `{field}` are errors.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import Field, model_validator

from moekit.config import StrictModel, parse_config

Level = Literal["object", "relation"]
Family = Literal[
    "appearance",
    "position",
    "motion",
    "interaction",
    "new_object",
    "state_change",
    "relation_persists",
    "relation_appears",
    "relation_evolves",
    "relation_strength",
    "relation_new",
]
FAMILIES: tuple[str, ...] = get_args(Family)
LEVEL: dict[str, Level] = {f: ("relation" if f.startswith("relation_") else "object") for f in FAMILIES}

_GENERATOR = """Two scene graphs describe one scene: the first comes from an image, the second from a {other}. \
Objects that carry the same id in both graphs are the same physical object.

Image scene graph:
{image_graph}

{Other} scene graph:
{other_graph}

Write up to {count} question-answer pairs that link the image with the {other} {focus}. Every question must \
need both the image and the {other}, and must be answerable from the two graphs alone. Each pair has a "family", \
one of:
{families}
Rules: mention only objects, attributes and relations that the graphs contain; never mention ids, boxes or \
coordinates; do not ask about the scene as a whole; keep each answer to a few words.
Reply with JSON only, in this form:
{{"qas": [{{"family": "...", "question": "...", "answer": "..."}}]}}"""

DEFAULTS: dict[str, Any] = {
    "generator": {
        "object": _GENERATOR.replace("{focus}", "about single objects (a cup, a child, a sofa)"),
        "relation": _GENERATOR.replace("{focus}", "about relations between two objects"),
    },
    "verifier": (
        "You are given an image and a {other}, with their scene graphs.\n"
        "Image scene graph: {image_graph}\n{Other} scene graph: {other_graph}\n"
        "Question: {question}\nAnswer in a few words."
    ),
    "family_notes": {
        "appearance": "an object of the image is, or is no longer, seen in the {other}",
        "position": "where an object is in the {other} compared with the image",
        "motion": "which way an object moves in the {other}",
        "interaction": "what one object does with another in the {other}",
        "new_object": "an object that the {other} shows and the image does not",
        "state_change": "an attribute or state of an object that differs between the image and the {other}",
        "relation_persists": "whether a relation of the image still holds in the {other}",
        "relation_appears": "when a relation starts or stops in the {other}",
        "relation_evolves": "how a relation of the image has changed by the end of the {other}",
        "relation_strength": "whether the bond between two objects gets stronger or weaker",
        "relation_new": "a relation that only the {other} shows",
    },
    "rules": {
        "appearance_video": "The {a} is in the image. Can it still be seen in the video?",
        "appearance_3d": "Is the {a} of the room visible in the image?",
        "new_object_video": "Which object shows up in the video but is not in the image?",
        "new_object_3d": "How many objects of the room cannot be seen in the image?",
        "position_video": "Compared with the image, where is the {a} at the end of the video?",
        "position_3d": "In the image, is the {a} to the left or to the right of the {b}?",
        "nearer_3d": "In the image, which is nearer to the camera: the {a} or the {b}?",
        "motion": "Which way does the {a} move during the video?",
        "interaction": "The {a} and the {b} are both in the image. What is the {a} doing with the {b} in the video?",
        "state_change": "The {a} is {before} in the image. How is it in the video?",
        "relation_persists_video": "In the image, the {a} is {p} the {b}. Is the {a} still {p} the {b} in the video?",
        "relation_persists_3d": "The room's graph says the {a} is {p} the {b}. Does the image show both of them?",
        "relation_appears": "When in the video does the relation '{a} {p} {b}' begin?",
        "relation_disappears": "In the image, the {a} is {p} the {b}. When in the video does that end?",
        "relation_evolves": "In the image, the {a} is {p} the {b}. How is the {a} related to the {b} at the end of "
        "the video?",
        "relation_strength": "Compared with the image, is the bond between the {a} and the {b} stronger, weaker or "
        "the same at the end of the video?",
        "relation_new_video": "In the video, the {a} is {p} something that is not in the image. What is it?",
        "relation_new_3d": "In the room, the {a} is {p} something that the image does not show. What is it?",
    },
    "words": {
        "yes": "yes",
        "no": "no",
        "left": "left",
        "right": "right",
        "up": "up",
        "down": "down",
        "still": "it stays in place",
        "further_left": "further left",
        "further_right": "further right",
        "higher": "higher",
        "lower": "lower",
        "same_place": "in the same place",
        "start": "at the start",
        "middle": "in the middle",
        "end": "near the end",
        "stronger": "stronger",
        "weaker": "weaker",
        "same": "the same",
        "and": "and",
    },
}
# The {fields} each template is filled with (exactly these).
GENERATOR_FIELDS = {"other", "Other", "image_graph", "other_graph", "count", "families"}
VERIFIER_FIELDS = {"other", "Other", "image_graph", "other_graph", "question"}
RULE_FIELDS = {
    "appearance_video": {"a"},
    "appearance_3d": {"a"},
    "new_object_video": set(),
    "new_object_3d": set(),
    "position_video": {"a"},
    "position_3d": {"a", "b"},
    "nearer_3d": {"a", "b"},
    "motion": {"a"},
    "interaction": {"a", "b"},
    "state_change": {"a", "before"},
    "relation_persists_video": {"a", "p", "b"},
    "relation_persists_3d": {"a", "p", "b"},
    "relation_appears": {"a", "p", "b"},
    "relation_disappears": {"a", "p", "b"},
    "relation_evolves": {"a", "p", "b"},
    "relation_strength": {"a", "b"},
    "relation_new_video": {"a", "p"},
    "relation_new_3d": {"a", "p"},
}


def fields_of(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


class Templates(StrictModel):
    """Every text of the builder; see the module docstring."""

    generator: dict[Level, str]
    verifier: str
    family_notes: dict[Family, str]
    rules: dict[str, str]
    words: dict[str, str]
    qas_per_prompt: int = Field(6, ge=1, le=50, description="question-answer pairs asked for per generator prompt")

    @model_validator(mode="after")
    def _check(self) -> Templates:
        problems = []
        checks = [(f"generator.{k}", v, GENERATOR_FIELDS) for k, v in self.generator.items()]
        checks.append(("verifier", self.verifier, VERIFIER_FIELDS))
        checks += [(f"family_notes.{k}", v, {"other"} & fields_of(v)) for k, v in self.family_notes.items()]
        for key, text in self.rules.items():
            if key not in RULE_FIELDS:
                problems.append(f"rules.{key}: unknown rule template (known: {', '.join(RULE_FIELDS)})")
            else:
                checks.append((f"rules.{key}", text, RULE_FIELDS[key]))
        unknown_words = set(self.words) - set(DEFAULTS["words"])
        if unknown_words:
            problems.append(f"words: unknown key(s) {sorted(unknown_words)}")
        for where, text, want in checks:
            try:
                have = fields_of(text)
            except ValueError as exc:
                problems.append(f"{where}: not a valid template ({exc})")
                continue
            if have != want:
                problems.append(f"{where}: uses fields {sorted(have)}, expected exactly {sorted(want)}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


class _TextLoader(yaml.SafeLoader):
    """YAML without 1.1 booleans: `yes: yep` and `still: no` stay text, as template words must."""


_TextLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in found if tag != "tag:yaml.org,2002:bool"]
    for first, found in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_templates(path: str | Path | None = None) -> Templates:
    """The default templates, with the YAML file at `path` merged over them."""
    data = DEFAULTS
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: templates file not found")
        try:
            override = yaml.load(path.read_text(), Loader=_TextLoader) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(override, dict):
            raise ValueError(f"{path}: expected a mapping of template keys")
        data = _merge(DEFAULTS, override)
    return parse_config(Templates, data, source=str(path) if path else "csqa templates")


class _BlockDumper(yaml.SafeDumper):
    """Multi-line templates as `|` blocks, so the printed YAML reads like the prompt."""


_BlockDumper.add_representer(
    str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)
)


def default_yaml() -> str:
    """The default templates as YAML (a starting point for `--templates`)."""
    data = {**DEFAULTS, "qas_per_prompt": 6}
    return yaml.dump(data, Dumper=_BlockDumper, sort_keys=False, width=120, allow_unicode=True)
