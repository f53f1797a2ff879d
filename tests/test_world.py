"""The built-in world: determinism, held-out combinations, captions, rendering, audio, stories, make_world."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from counterpoint.cli import main as cli_main
from counterpoint.data.make_world import make_world
from counterpoint.data.pairs import load_pairs
from counterpoint.data.readers import detect_format
from counterpoint.data.world import (
    _SHAPE_F0,
    CELLS,
    COLOUR_NAMES,
    COLOUR_WORDS,
    COLOURS,
    PROMPT_TEMPLATES,
    SHAPE_WORDS,
    SHAPES,
    SIZE_WORDS,
    Scene,
    World,
    WorldConfig,
    WorldObject,
    all_classes,
    heldout_combinations,
    render_scene,
    synthesize_audio,
)

# ----------------------------------------------------------------------------------------------------------
# helpers: reading captions and images back without the generator's internals


def _alt(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


WORD_TO_COLOUR = {w: c for c, ws in COLOUR_WORDS.items() for w in ws}
WORD_TO_SHAPE = {w: s for s, ws in SHAPE_WORDS.items() for w in ws}
WORD_TO_SIZE = {w: z for z, ws in SIZE_WORDS.items() for w in ws}
PHRASE_TO_CELL = {p: i for i, ps in enumerate(CELLS) for p in ps}
OBJECT_RE = re.compile(rf"\b({_alt(WORD_TO_SIZE)}) ({_alt(WORD_TO_COLOUR)}) ({_alt(WORD_TO_SHAPE)})"
                       rf"(?: ({_alt(PHRASE_TO_CELL)}))?")
CELL_RE = re.compile(_alt(PHRASE_TO_CELL))
PALETTE = np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float64)


def describes(caption: str, obj: WorldObject) -> bool:
    """``caption`` names ``obj`` as "<size> <colour> <shape>" (synonyms allowed)."""
    found = OBJECT_RE.findall(caption.lower())
    named = {(WORD_TO_SIZE[z], WORD_TO_COLOUR[c], WORD_TO_SHAPE[s]) for z, c, s, _ in found}
    return (obj.size, obj.colour, obj.shape) in named


def describes_scene(caption: str, scene: Scene) -> bool:
    return all(describes(caption, o) for o in scene.objects)


def word_count(caption: str, words) -> int:
    return len(re.findall(rf"\b(?:{_alt(words)})\b", caption.lower()))


def attribute_mentions(caption: str) -> int:
    return sum(word_count(caption, ws) for ws in (WORD_TO_COLOUR, WORD_TO_SHAPE, WORD_TO_SIZE))


def palette_pixels(img: np.ndarray, max_dist: float = 40.0) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: index of the nearest palette colour, and whether it is within ``max_dist`` of it (i.e. a
    solid object pixel; the grey background and anti-aliased edges are far from every palette colour)."""
    d = np.linalg.norm(img.astype(np.float64)[..., None, :] - PALETTE, axis=-1)
    return d.argmin(-1), d.min(-1) < max_dist


def colours_in(img: np.ndarray, min_pixels: int = 8) -> set[str]:
    nearest, solid = palette_pixels(img)
    counts = Counter(nearest[solid].tolist())
    return {COLOUR_NAMES[i] for i, n in counts.items() if n >= min_pixels}


def cell_colours(img: np.ndarray, cell: int) -> Counter:
    """Palette colours of the solid pixels in the middle 60% of a 3x3 grid cell."""
    s = img.shape[0]
    r, c = divmod(cell, 3)
    lo, hi = lambda k: int(round((k + 0.2) * s / 3)), lambda k: int(round((k + 0.8) * s / 3))
    nearest, solid = palette_pixels(img[lo(r):hi(r), lo(c):hi(c)])
    return Counter(COLOUR_NAMES[i] for i in nearest[solid].tolist())


# ----------------------------------------------------------------------------------------------------------
# determinism


def test_pairs_are_a_pure_function_of_seed_split_index() -> None:
    a, b = World(WorldConfig(seed=5)), World(WorldConfig(seed=5))
    for split in ("train", "test", "zeroshot", "val"):
        for i in (0, 7, 123_456):
            first = a.pair(split, i, with_audio=True)
            again, fresh = a.pair(split, i, with_audio=True), b.pair(split, i, with_audio=True)
            for other in (again, fresh):
                assert other.image.tobytes() == first.image.tobytes()
                assert other.caption == first.caption
                assert other.scene == first.scene and other.key == first.key
                assert np.array_equal(other.audio, first.audio)
    assert a.pair("train", 3).key == "train-00000003"
    assert b.labelled(9).image.tobytes() == a.labelled(9).image.tobytes()
    # another seed, another index or another split gives another sample
    other_seed = World(WorldConfig(seed=6))
    differ = sum(other_seed.pair("train", i).image.tobytes() != a.pair("train", i).image.tobytes()
                 for i in range(20))
    assert differ == 20
    assert len({other_seed.pair("train", i).caption for i in range(20)}
               | {a.pair("train", i).caption for i in range(20)}) > 30
    assert a.pair("train", 0).image.tobytes() != a.pair("train", 1).image.tobytes()
    assert a.pair("train", 0).image.tobytes() != a.pair("test", 0).image.tobytes()


# ----------------------------------------------------------------------------------------------------------
# held-out combinations


@pytest.mark.parametrize("num_heldout", [0, 1, 8, 13, 32])
def test_heldout_combinations(num_heldout: int) -> None:
    held = heldout_combinations(WorldConfig(num_heldout=num_heldout))
    assert len(held) == num_heldout
    assert all(c in COLOURS and s in SHAPES for c, s in held)
    seen = {(c, s) for c in COLOUR_NAMES for s in SHAPES} - held
    assert {c for c, _ in seen} == set(COLOUR_NAMES)  # every colour and every shape stays trainable
    assert {s for _, s in seen} == set(SHAPES)
    if num_heldout % len(COLOUR_NAMES) == 0:  # whole diagonals: held out equally often
        assert len(set(Counter(c for c, _ in held).values())) <= 1
        assert len(set(Counter(s for _, s in held).values())) <= 1


def test_training_split_never_shows_heldout_combinations() -> None:
    world = World(WorldConfig(seed=2))
    assert len(world.heldout) == 8
    train_combos: Counter = Counter()
    for i in range(3000):
        s = world.pair("train", i)
        train_combos.update((o.colour, o.shape) for o in s.scene.objects)
        assert not s.heldout
    assert not set(train_combos) & world.heldout
    assert set(train_combos) == {(c, s) for c in COLOUR_NAMES for s in SHAPES} - world.heldout
    assert not any((o.colour, o.shape) in world.heldout
                   for i in range(300) for o in world.pair("val", i).scene.objects)
    # the evaluation splits draw from every combination, held-out ones included
    for split in ("test", "zeroshot"):
        samples = [world.pair(split, i) for i in range(400)]
        combos = {(o.colour, o.shape) for s in samples for o in s.scene.objects}
        assert combos & world.heldout, split
        assert len(combos) == 64, split
        for s in samples:  # the flag says whether the first object (the label) is held out
            assert s.heldout == ((s.scene.objects[0].colour, s.scene.objects[0].shape) in world.heldout)
        assert any(s.heldout for s in samples)
    labelled = [world.labelled(i) for i in range(64)]
    assert sum(s.heldout for s in labelled) == 8
    assert {s.label for s in labelled if s.heldout} == {f"{c} {s}" for c, s in world.heldout}


# ----------------------------------------------------------------------------------------------------------
# captions


@pytest.mark.parametrize("position_prob", [1.0, 0.5, 0.0])
def test_literal_captions_name_every_object(position_prob: float) -> None:
    world = World(WorldConfig(seed=3, position_prob=position_prob))
    sizes = Counter()
    with_place = 0
    for i in range(300):
        s = world.pair("train", i)
        sizes[len(s.scene.objects)] += 1
        assert describes_scene(s.caption, s.scene), (s.caption, s.scene)
        cells = [PHRASE_TO_CELL[m] for m in CELL_RE.findall(s.caption.lower())]
        # Places are named for every object or for none.
        assert sorted(cells) in ([], sorted(o.cell for o in s.scene.objects)), s.caption
        with_place += bool(cells)
    assert with_place / 300 == pytest.approx(position_prob, abs=0.08)
    assert set(sizes) == {1, 2, 3}  # single- and multi-object templates both exercised
    # a scene with objects of other attributes is not "described" (the check can fail)
    s = world.pair("train", 0)
    o = s.scene.objects[0]
    wrong = WorldObject(o.shape, next(c for c in COLOUR_NAMES if c != o.colour), o.size, o.cell)
    assert not describes(s.caption, wrong) or len(s.scene.objects) > 1


def test_weak_captions_mention_fewer_attributes() -> None:
    literal = World(WorldConfig(seed=4))
    weak = World(WorldConfig(seed=4, caption_mode="weak"))
    lit = [literal.pair("train", i) for i in range(400)]
    wk = [weak.pair("train", i) for i in range(400)]
    assert [a.image.tobytes() for a in lit[:20]] == [b.image.tobytes() for b in wk[:20]]  # same scenes
    lit_mentions = np.mean([attribute_mentions(s.caption) for s in lit])
    weak_mentions = np.mean([attribute_mentions(s.caption) for s in wk])
    assert weak_mentions < 0.7 * lit_mentions, (weak_mentions, lit_mentions)
    assert np.mean([describes_scene(s.caption, s.scene) for s in wk]) < 0.5
    assert any("something" in s.caption for s in wk)  # loose "warm and round" talk
    assert all(s.caption.endswith(".") and s.caption.strip() for s in wk)
    # weak text still tends to be about the scene: some colour of the scene is named most of the time
    named = [any(word_count(s.caption, COLOUR_WORDS[o.colour]) for o in s.scene.objects) for s in wk]
    assert np.mean(named) > 0.5


def test_mismatch_fraction() -> None:
    clean = World(WorldConfig(seed=8, mismatch_fraction=0.0))
    noisy = World(WorldConfig(seed=8, mismatch_fraction=1.0))
    half = World(WorldConfig(seed=8, mismatch_fraction=0.5))

    def described(world: World) -> list[bool]:
        return [describes_scene(s.caption, s.scene) for s in (world.pair("train", i) for i in range(300))]

    clean_ok, noisy_ok, half_ok = described(clean), described(noisy), described(half)
    assert all(clean_ok)
    assert np.mean(noisy_ok) < 0.1
    assert 0.35 < np.mean(half_ok) < 0.65
    # the truth is recorded with every pair: "matched" is False exactly where the caption is another scene's
    half_pairs = [half.pair("train", i) for i in range(300)]
    assert [s.meta()["matched"] for s in half_pairs] == [s.matched for s in half_pairs]
    assert all(describes_scene(s.caption, s.scene) for s in half_pairs if s.matched)
    assert np.mean([describes_scene(s.caption, s.scene) for s in half_pairs if not s.matched]) < 0.1
    assert all(clean.pair("train", i).matched for i in range(50))
    # noise changes only the text: the images (and labels) are those of the clean world
    for i in range(10):
        assert noisy.pair("train", i).image.tobytes() == clean.pair("train", i).image.tobytes()
        assert noisy.pair("train", i).label == clean.pair("train", i).label
    # mismatched captions are still well-formed captions of *some* scene
    assert all(OBJECT_RE.search(noisy.pair("train", i).caption.lower()) for i in range(50))


def test_labelled_cycles_through_all_classes() -> None:
    world = World(WorldConfig(seed=1))
    classes = all_classes()
    assert len(classes) == 64 and len(set(classes)) == 64
    samples = [world.labelled(i) for i in range(192)]
    assert Counter(s.label for s in samples) == {c: 3 for c in classes}
    for i, s in enumerate(samples):
        assert s.label == classes[i % 64]
        assert len(s.scene.objects) == 1 and s.key == f"zeroshot-{i:08d}"
        assert describes_scene(s.caption, s.scene)
    assert world.pair("test", 0).label == " ".join((world.pair("test", 0).scene.objects[0].colour,
                                                    world.pair("test", 0).scene.objects[0].shape))


# ----------------------------------------------------------------------------------------------------------
# rendering


@pytest.mark.parametrize("size", [32, 64])
def test_image_shape_and_dtype(size: int) -> None:
    world = World(WorldConfig(seed=0, image_size=size))
    for img in (world.pair("train", 0).image, world.labelled(5).image, world.story(0)["images"][1]):
        assert img.shape == (size, size, 3) and img.dtype == np.uint8
    assert world.pair("train", 0).image.std() > 5  # not a blank canvas


@pytest.mark.parametrize("shape", ["square", "circle", "star", "ring"])
def test_rendered_object_has_its_colour(shape: str) -> None:
    cfg = WorldConfig(image_size=64)
    for k, colour in enumerate(COLOUR_NAMES):
        scene = Scene((WorldObject(shape, colour, "large", 4),))
        img = render_scene(scene, np.random.default_rng(100 + k), cfg).astype(np.float64)
        background = np.median(np.concatenate([img[:6, :6], img[-6:, -6:]]).reshape(-1, 3), axis=0)
        far = np.linalg.norm(img - background, axis=-1) > 60
        assert far.sum() > 150, (colour, far.sum())  # a large object covers a good part of the canvas
        dominant = np.median(img[far], axis=0)
        assert np.abs(dominant - COLOURS[colour]).max() < 30, (colour, dominant)
        ys, xs = np.nonzero(far)  # centred in the middle cell
        assert abs(ys.mean() - 31.5) < 5 and abs(xs.mean() - 31.5) < 5
        assert colours_in(img.astype(np.uint8)) == {colour}
    # the object sits in its cell
    img = render_scene(Scene((WorldObject(shape, "red", "small", 2),)), np.random.default_rng(1), cfg)
    assert cell_colours(img, 2)["red"] > 20 and sum(cell_colours(img, 6).values()) == 0


def test_image_noise_knob() -> None:
    scene = Scene((WorldObject("square", "blue", "large", 4),))
    quiet = render_scene(scene, np.random.default_rng(0), WorldConfig(image_size=64, background_noise=0.0))
    noisy = render_scene(scene, np.random.default_rng(0), WorldConfig(image_size=64, background_noise=0.0,
                                                                      image_noise=40.0))
    centre = (slice(28, 36), slice(28, 36))
    assert quiet[centre].astype(float).std(axis=(0, 1)).max() < 1.0  # a flat object colour
    assert noisy[centre].astype(float).std(axis=(0, 1)).min() > 20


# ----------------------------------------------------------------------------------------------------------
# audio


@pytest.mark.parametrize(("sr", "seconds"), [(16000, 0.5), (8000, 0.25), (22050, 1.0)])
def test_audio_length_and_range(sr: int, seconds: float) -> None:
    cfg = WorldConfig(audio_sample_rate=sr, audio_seconds=seconds, audio_snr_db=-5.0)
    world = World(cfg)
    for i in range(5):
        audio = world.pair("train", i, with_audio=True).audio
        assert audio.shape == (int(round(sr * seconds)),) and audio.dtype == np.float32
        assert np.abs(audio).max() <= 1.0 and np.abs(audio).max() > 0.05
    assert world.pair("train", 0).audio is None


def spectrum_peak(audio: np.ndarray, sr: int) -> float:
    n = 1 << 17  # zero-padded: ~0.12 Hz bins
    mag = np.abs(np.fft.rfft(audio * np.hanning(len(audio)), n))
    return float(np.fft.rfftfreq(n, 1 / sr)[mag.argmax()])


@pytest.mark.parametrize("shape", SHAPES)
def test_audio_pitch_encodes_shape(shape: str) -> None:
    cfg = WorldConfig(audio_snr_db=60.0)
    scene = Scene((WorldObject(shape, "red", "large", 0),))  # red: a pure tone, no overtones
    seed = SHAPES.index(shape)
    audio = synthesize_audio(scene, np.random.default_rng(seed), cfg)
    # the tone is the shape's fundamental times a small jitter, the first draw of the generator
    f0 = _SHAPE_F0[shape] * np.random.default_rng(seed).uniform(0.985, 1.015)
    peak = spectrum_peak(audio, cfg.audio_sample_rate)
    assert abs(peak - f0) < 2.0, (peak, f0)
    nearest = min(_SHAPE_F0, key=lambda s: abs(np.log(_SHAPE_F0[s] / peak)))
    assert nearest == shape
    # colour is timbre: cyan puts most energy on the 6th harmonic
    cyan_scene = Scene((WorldObject(shape, "cyan", "large", 0),))
    cyan = synthesize_audio(cyan_scene, np.random.default_rng(seed), cfg)
    if 6 * f0 < cfg.audio_sample_rate / 2:
        assert abs(spectrum_peak(cyan, cfg.audio_sample_rate) - 6 * f0) < 6 * 2.0


def test_lower_snr_means_more_noise() -> None:
    scene = Scene((WorldObject("circle", "red", "large", 2),))  # right column: the tone starts after 0.1 s
    powers = {}
    for snr in (30.0, 10.0, 0.0):
        audio = synthesize_audio(scene, np.random.default_rng(0), WorldConfig(audio_snr_db=snr))
        powers[snr] = float(np.mean(audio[:1400] ** 2))  # the silent lead-in holds only noise
    assert powers[0.0] > 5 * powers[10.0] > 25 * powers[30.0] > 0


# ----------------------------------------------------------------------------------------------------------
# stories


def parse_objects(text: str) -> list[dict]:
    found = []
    for z, c, s, cell in OBJECT_RE.findall(text.lower()):
        found.append({"size": WORD_TO_SIZE[z], "colour": WORD_TO_COLOUR[c], "shape": WORD_TO_SHAPE[s],
                      "cell": PHRASE_TO_CELL[cell] if cell else None})
    if len(found) == 1 and found[0]["cell"] is None:  # single-object templates put the place elsewhere
        (place,) = CELL_RE.findall(text.lower())
        found[0]["cell"] = PHRASE_TO_CELL[place]
    return found


def apply_event(state: list[dict], sentence: str, heldout: frozenset) -> tuple[str, list[list[dict]]]:
    """Parse one event sentence and check it is legal in ``state``; returns its kind and the possible next
    states (several when the sentence names "the pink cross" and there are two of them)."""
    occupied = {o["cell"] for o in state}

    def each(colour: str, shape: str, /, **change: str | int | bool) -> list[list[dict]]:
        """One next state per object named "the <colour> <shape>", with ``change`` applied (or removed)."""
        options = []
        for i, o in enumerate(state):
            if (o["colour"], o["shape"]) != (colour, shape):
                continue
            new = [dict(x) for x in state]
            if change.get("remove"):
                del new[i]
            else:
                new[i].update(change)
            options.append(new)
        assert options, (sentence, state)
        return options

    if m := re.fullmatch(r"then the (\w+) (\w+) moves; now it is (.+)\.", sentence):
        cell = PHRASE_TO_CELL[m[3]]
        assert cell not in occupied
        return "move", each(m[1], m[2], cell=cell)
    if m := re.fullmatch(r"then the (\w+) (\w+) turns (\w+)\.", sentence):
        assert m[3] != m[1] and (m[3], m[2]) not in heldout
        return "recolour", each(m[1], m[2], colour=m[3])
    if m := re.fullmatch(r"then a (.+) appears\.", sentence):
        (new,) = parse_objects(m[1])
        assert len(state) < 3 and new["cell"] not in occupied
        return "appear", [[*(dict(x) for x in state), new]]
    if m := re.fullmatch(r"then the (\w+) (\w+) disappears\.", sentence):
        assert len(state) > 1
        return "vanish", each(m[1], m[2], remove=True)
    if m := re.fullmatch(r"then the (\w+) (\w+) becomes (small|large)\.", sentence):
        options = [o for o in each(m[1], m[2], size=m[3]) if o != state]
        assert options, (sentence, state)  # the size really flips
        return "resize", options
    raise AssertionError(f"not an event: {sentence!r}")


def image_shows(img: np.ndarray, state: list[dict]) -> bool:
    """The image has exactly the state's colours, each object's colour dominates its cell, empty cells hold
    (almost) no object pixels."""
    if colours_in(img) != {o["colour"] for o in state}:
        return False
    for o in state:
        counts = cell_colours(img, o["cell"])
        if not counts or counts.most_common(1)[0][0] != o["colour"]:
            return False
    return all(sum(cell_colours(img, c).values()) < 12 for c in set(range(9)) - {o["cell"] for o in state})


def test_stories_are_consistent_interleaved_documents() -> None:
    steps = 5
    world = World(WorldConfig(seed=11, image_size=64))
    kinds = Counter()
    for index in range(12):
        story = world.story(index, steps)
        texts, images = story["texts"], story["images"]
        assert story["key"] == f"story-{index:08d}"
        assert len(texts) == len(images) == 2 * steps
        assert all(t is not None and i is None for t, i in zip(texts[::2], images[::2]))
        assert all(t is None and i is not None for t, i in zip(texts[1::2], images[1::2]))
        # the first text describes the first image's scene
        state = parse_objects(texts[0])
        assert 1 <= len(state) <= 2 and len({o["cell"] for o in state}) == len(state)
        assert image_shows(images[1], state), (texts[0], state)
        assert not image_shows(images[1], [{**o, "cell": (o["cell"] + 1) % 9} for o in state])
        # every later sentence is exactly one event, and the next image shows the new state
        for sentence, img in zip(texts[2::2], images[3::2]):
            kind, options = apply_event(state, sentence, world.heldout)
            kinds[kind] += 1
            assert all(option != state for option in options)
            shown = [option for option in options if image_shows(img, option)]
            assert shown, (sentence, state)
            state = shown[0]
            assert not any((o["colour"], o["shape"]) in world.heldout for o in state)
        again = world.story(index, steps)
        assert again["texts"] == texts
        assert all((a is None and b is None) or np.array_equal(a, b) for a, b in zip(images, again["images"]))
    assert len(kinds) >= 4, kinds


# ----------------------------------------------------------------------------------------------------------
# make_world: every format reads back through the real readers


SPLITS = {"train": 12, "test": 6, "zeroshot": 16}


def expected(world: World, split: str, n: int, with_audio: bool = False) -> list:
    return [world.labelled(i, with_audio) if split == "zeroshot" else world.pair(split, i, with_audio)
            for i in range(n)]


@pytest.mark.parametrize(("fmt", "image_format"), [("wds", "png"), ("csv", "png"), ("folder", "png"),
                                                   ("wds", "jpg"), ("folder", "webp")])
def test_make_world_reads_back(tmp_path: Path, fmt: str, image_format: str) -> None:
    cfg = WorldConfig(seed=21, num_heldout=6)
    out = tmp_path / "world"
    info = make_world(out, cfg, fmt, stories=2 if fmt != "wds" else 0, image_format=image_format,
                      progress=False, **SPLITS)
    world = World(cfg)
    for split, n in SPLITS.items():
        assert detect_format(str(out / split)) == fmt
        pairs = load_pairs(str(out / split), cfg.image_size)
        want = expected(world, split, n)
        assert len(pairs) == n, split
        assert pairs.captions == [s.caption for s in want]
        assert pairs.labels == [s.label for s in want]
        assert pairs.skips.total == 0
        images = torch.from_numpy(np.stack([s.image for s in want])).permute(0, 3, 1, 2)
        diff = (pairs.images.int() - images.int()).abs().float()
        if image_format == "png":
            assert diff.max() == 0, split
        else:
            assert diff.mean() < 12, (split, diff.mean())
    on_disk = json.loads((out / "world.json").read_text())
    assert on_disk == json.loads(json.dumps(info))
    assert on_disk["classes"] == all_classes() and len(on_disk["classes"]) == 64
    assert on_disk["templates"] == list(PROMPT_TEMPLATES)
    assert len(on_disk["heldout"]) == 6 and set(on_disk["heldout"]) <= set(on_disk["classes"])
    assert set(on_disk["heldout"]) == {f"{c} {s}" for c, s in world.heldout}
    assert on_disk["world"]["seed"] == 21 and on_disk["format"] == fmt
    assert on_disk["splits"]["train"] == SPLITS["train"]
    stories = out / "stories" / "stories.jsonl"
    if fmt == "wds":
        assert not stories.exists()
        return
    lines = stories.read_text().splitlines()
    assert len(lines) == 2
    for i, line in enumerate(lines):
        doc = json.loads(line)
        assert doc["texts"] == world.story(i)["texts"]
        assert len(doc["texts"]) == len(doc["images"])
        for j, name in enumerate(doc["images"]):
            if j % 2 == 0:
                assert name is None and doc["texts"][j]
                continue
            with Image.open(out / "stories" / name) as img:
                assert img.size == (cfg.image_size, cfg.image_size)
                assert np.array_equal(np.asarray(img), world.story(i)["images"][j])


def test_make_world_with_audio_via_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "w"
    rc = cli_main(["data", "make", "world", "--out", str(out), "--train", "4", "--test", "2",
                   "--zeroshot", "3", "--audio", "--seed", "4", "--quiet"])
    assert rc == 0
    assert "wrote the built-in world" in capsys.readouterr().out
    cfg = WorldConfig(seed=4)
    world = World(cfg)
    for split, n in (("train", 4), ("test", 2), ("zeroshot", 3)):
        (shard,) = sorted((out / split).glob("*.tar"))
        with tarfile.open(shard) as tar:
            wavs = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".wav")}
        want = expected(world, split, n, with_audio=True)
        assert sorted(wavs) == [f"{s.key}.wav" for s in want]
        for s in want:
            audio, sr = sf.read(io.BytesIO(wavs[f"{s.key}.wav"]), dtype="float32")
            assert sr == cfg.audio_sample_rate
            assert audio.shape == (int(cfg.audio_sample_rate * cfg.audio_seconds),)
            assert np.abs(audio - s.audio).max() < 1e-3  # 16-bit PCM
        assert len(load_pairs(str(out / split), 32)) == n  # the extra member does not disturb the reader
    assert rc == 0


def test_make_world_csv_and_folder_audio_files(tmp_path: Path) -> None:
    cfg = WorldConfig(seed=9)
    make_world(tmp_path / "c", cfg, "csv", train=3, test=0, zeroshot=0, with_audio=True, progress=False)
    make_world(tmp_path / "f", cfg, "folder", train=3, test=0, zeroshot=0, with_audio=True, progress=False)
    header = (tmp_path / "c" / "train" / "pairs.csv").read_text().splitlines()[0]
    assert header == "image,caption,label,audio"
    assert not (tmp_path / "c" / "test").exists()
    world = World(cfg)
    for i in range(3):
        ref = world.pair("train", i, with_audio=True).audio
        for wav in (tmp_path / "c" / "train" / "files" / f"train-{i:08d}.wav",
                    tmp_path / "f" / "train" / f"train-{i:08d}.wav"):
            audio, _ = sf.read(wav, dtype="float32")
            assert np.abs(audio - ref).max() < 1e-3
    assert len(load_pairs(str(tmp_path / "f" / "train"), 32)) == 3


def test_parallel_world_writing_gives_the_same_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shards written by two processes at once are byte for byte those one process writes, and two reader
    processes read them back in index order, as one does."""
    from counterpoint.data import make_world as module

    monkeypatch.setattr(module, "SAMPLES_PER_SHARD", 5)
    cfg = WorldConfig(seed=5)
    for workers in (1, 2):
        make_world(tmp_path / str(workers), cfg, "wds", train=23, test=0, zeroshot=0, progress=False,
                   workers=workers)
    one, two = sorted((tmp_path / "1" / "train").iterdir()), sorted((tmp_path / "2" / "train").iterdir())
    assert [p.name for p in one] == [p.name for p in two] == [*(f"shard-{i:06d}.tar" for i in range(5)), "sizes.json"]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(one, two))
    assert json.loads((tmp_path / "2" / "train" / "sizes.json").read_text())["shard-000004.tar"] == 3
    pairs = load_pairs(str(tmp_path / "2" / "train"), cfg.image_size, workers=2)  # shards decoded at once
    assert pairs.captions == [s.caption for s in expected(World(cfg), "train", 23)]
    one_reader = load_pairs(str(tmp_path / "2" / "train"), cfg.image_size, workers=1)
    assert torch.equal(pairs.images, one_reader.images) and pairs.keys == one_reader.keys
