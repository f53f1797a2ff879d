"""The world-grammar caption parser (``evaluate/caption_attributes.py``) recovers the scene from the world's own
literal captions, and the scores count multisets."""

from __future__ import annotations

from collections import Counter

import numpy as np

from counterpoint.data.world import Scene, WorldConfig, WorldObject, literal_caption, sample_scene
from counterpoint.evaluate.caption_attributes import NamedObject, attribute_scores, parse_caption, scene_objects


def test_literal_captions_parse_back_to_their_scenes() -> None:
    """Every template, synonym and place phrase of 2,000 random scenes: the parsed objects are the scene's."""
    cfg = WorldConfig()
    for i in range(2000):
        rng = np.random.default_rng([11, i])
        scene = sample_scene(rng, cfg)
        caption = literal_caption(scene, rng, position_prob=1.0)
        assert Counter(parse_caption(caption)) == Counter(scene_objects(scene)), caption


def test_parts_a_caption_leaves_out_are_none() -> None:
    assert parse_caption("A photo showing a crimson five-pointed star.") == [NamedObject(None, "red", "star", None)]
    assert parse_caption("At the top left, a tiny half-moon.") == [NamedObject("small", None, "crescent", 0)]
    assert parse_caption("a cat on a mat") == []


def test_scores_are_multiset_precision_and_recall() -> None:
    scene = Scene((WorldObject("star", "red", "small", 0), WorldObject("ring", "red", "large", 4)))
    single = Scene((WorldObject("square", "blue", "large", 8),))
    captions = ["a small red star and a big green ring.",  # colours: red ok, green wrong; shapes both right
                "a large blue square at the bottom right."]
    scores = attribute_scores(captions, [scene, single])
    assert scores["all"]["n"] == 2 and scores["one_object"]["n"] == 1
    assert scores["all"]["colour_precision"] == 2 / 3 and scores["all"]["colour_recall"] == 2 / 3
    assert scores["all"]["shape_recall"] == 1.0 and scores["all"]["place_recall"] == 1 / 3
    assert scores["all"]["place_precision"] == 1.0
    assert scores["one_object"]["colour_recall"] == scores["one_object"]["shape_recall"] == 1.0
