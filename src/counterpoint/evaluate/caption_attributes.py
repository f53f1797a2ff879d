"""Captions checked against the truth only a generated world has: parse a caption with the built-in world's
grammar into objects (size, colour, shape, place) and compare them with the scene that was drawn.

BLEU and CIDEr compare words with reference captions; these scores say whether what a caption *claims* is
in the picture: per attribute, precision (how many named values are in the scene) and recall (how many of
the scene's values are named), over the multisets of values (two red objects need two "red"s).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from counterpoint.data.world import CELLS, COLOUR_WORDS, SHAPE_WORDS, SIZE_WORDS, Scene

ATTRIBUTES = ("size", "colour", "shape", "place")


@dataclass(frozen=True)
class NamedObject:
    """An object as a caption names it; ``None`` for what it leaves out."""

    size: str | None
    colour: str | None
    shape: str
    place: int | None


def _phrases() -> list[tuple[str, str, str | int]]:
    table: list[tuple[str, str, str | int]] = []
    for kind, words in (("size", SIZE_WORDS), ("colour", COLOUR_WORDS), ("shape", SHAPE_WORDS)):
        table += [(phrase, kind, value) for value, phrases in words.items() for phrase in phrases]
    table += [(phrase, "place", cell) for cell, phrases in enumerate(CELLS) for phrase in phrases]
    return sorted(table, key=lambda t: -len(t[0]))  # longest first: "at the top left" before "at the top"


_TABLE = _phrases()
_LOOKUP = {phrase: (kind, value) for phrase, kind, value in _TABLE}
_PATTERN = re.compile(r"(?<![\w-])(" + "|".join(re.escape(p) for p, _, _ in _TABLE) + r")(?![\w-])")


def parse_caption(caption: str) -> list[NamedObject]:
    """The objects a caption names, in order. Size and colour words belong to the next shape word; a place
    belongs to the object before it, or to the next one when none precedes it ("At the top, a red star.")."""
    objects: list[NamedObject] = []
    size = colour = None
    pending_place: int | None = None
    for match in _PATTERN.finditer(caption.lower()):
        kind, value = _LOOKUP[match.group(1)]
        if kind == "size":
            size = value
        elif kind == "colour":
            colour = value
        elif kind == "shape":
            objects.append(NamedObject(size, colour, value, pending_place))
            size = colour = pending_place = None
        elif objects and objects[-1].place is None and size is None and colour is None:
            last = objects[-1]
            objects[-1] = NamedObject(last.size, last.colour, last.shape, value)
        else:
            pending_place = value
    return objects


def _values(objects: list[NamedObject], attribute: str) -> Counter:
    return Counter(getattr(o, attribute) for o in objects if getattr(o, attribute) is not None)


def scene_objects(scene: Scene) -> list[NamedObject]:
    return [NamedObject(o.size, o.colour, o.shape, o.cell) for o in scene.objects]


def attribute_scores(captions: list[str], scenes: list[Scene]) -> dict[str, dict[str, float]]:
    """Precision and recall of every attribute over all ``captions`` of their ``scenes`` (micro-averaged),
    for all scenes and for one-object scenes; ``n`` captions in each group."""
    out: dict[str, dict[str, float]] = {}
    for group, keep in (("all", lambda s: True), ("one_object", lambda s: len(s.objects) == 1)):
        pairs = [(c, s) for c, s in zip(captions, scenes) if keep(s)]
        scores: dict[str, float] = {"n": len(pairs)}
        for attribute in ATTRIBUTES:
            hit = named = true = 0
            for caption, scene in pairs:
                said, real = _values(parse_caption(caption), attribute), _values(scene_objects(scene), attribute)
                hit += sum((said & real).values())
                named += sum(said.values())
                true += sum(real.values())
            scores[f"{attribute}_precision"] = hit / named if named else 0.0
            scores[f"{attribute}_recall"] = hit / true if true else 0.0
        out[group] = scores
    return out
