"""The built-in multimodal world: scenes, captions, audio and stories generated from a seed.

Nothing can be downloaded here, and a user wants to see a model learn before fetching terabytes, so
counterpoint ships a small world of its own. A *scene* holds 1-3 objects, each with a shape, a colour, a size
and a cell of a 3x3 grid. From one scene the world renders

* an image (32-64 px, anti-aliased shapes on a noisy background),
* a caption from a grammar with many templates and synonyms (``literal``), or a weakly correlated text that
  mentions only some attributes, adds unrelated words or speaks loosely (``weak``, for BriVL-style training),
* an audio clip whose spectrum encodes the objects (shape -> pitch, colour -> timbre, size -> loudness,
  column -> onset), with its own noise knob so modality imbalance can be dialled in.

Some colour-shape combinations are *held out*: they never occur in the training split (in no object of any
scene), so zero-shot classification on them measures compositional generalisation, not memory.

Every sample is a pure function of ``(seed, split, index)``: generation is deterministic, random-access and
trivially parallel.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache

import numpy as np
from PIL import Image, ImageDraw

# Eight shapes that stay distinct at ~10 px (a hexagon did not: it read as a circle or a square).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "crescent", "cross", "diamond", "ring")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (35, 175, 55),
    "blue": (45, 85, 235),
    "yellow": (240, 225, 40),
    "purple": (145, 55, 205),
    "orange": (250, 135, 20),
    "cyan": (40, 215, 225),
    "pink": (250, 125, 195),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SIZES: tuple[str, ...] = ("small", "large")
# 3x3 grid cells, row-major; the name used in captions and the synonyms a caption may use instead.
CELLS: tuple[tuple[str, ...], ...] = (
    ("at the top left", "in the upper left corner", "top left"),
    ("at the top", "along the top edge", "up top"),
    ("at the top right", "in the upper right corner", "top right"),
    ("on the left", "at the left side", "to the left"),
    ("in the center", "in the middle", "at the centre"),
    ("on the right", "at the right side", "to the right"),
    ("at the bottom left", "in the lower left corner", "bottom left"),
    ("at the bottom", "along the bottom edge", "down below"),
    ("at the bottom right", "in the lower right corner", "bottom right"),
)
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "round dot"),
    "square": ("square", "box"),
    "triangle": ("triangle", "three-sided shape"),
    "star": ("star", "five-pointed star"),
    "crescent": ("crescent", "moon", "half-moon"),
    "cross": ("cross", "plus sign"),
    "diamond": ("diamond", "rhombus"),
    "ring": ("ring", "hoop", "donut"),
}
COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson"),
    "green": ("green",),
    "blue": ("blue",),
    "yellow": ("yellow", "golden"),
    "purple": ("purple", "violet"),
    "orange": ("orange",),
    "cyan": ("cyan", "turquoise"),
    "pink": ("pink",),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
# Loose vocabulary for weakly correlated text.
COLOUR_FAMILY = {"red": "warm", "orange": "warm", "yellow": "warm", "pink": "warm",
                 "green": "cool", "blue": "cool", "purple": "cool", "cyan": "cool"}
SHAPE_FAMILY = {"circle": "round", "ring": "round", "crescent": "round", "square": "angular",
                "diamond": "angular", "triangle": "pointy", "star": "pointy", "cross": "angular"}
FILLERS: tuple[str, ...] = (
    "on a quiet afternoon", "as the light fades", "in my notebook", "says the caption", "from last week",
    "somewhere in the city", "for the record", "under a grey sky", "after the meeting", "just for fun",
)

SINGLE_TEMPLATES: tuple[str, ...] = (
    "a {o} {p}.", "there is a {o} {p}.", "a picture of a {o} {p}.", "{P}, a {o}.", "one {o} {p}.",
    "an image with a {o} {p}.", "we see a {o} {p}.", "a {o} sits {p}.", "a photo showing a {o} {p}.",
    "only a {o}, {p}.",
)
PLAIN_TEMPLATES: tuple[str, ...] = (
    "a {o}.", "there is a {o}.", "a picture of a {o}.", "one {o}.", "an image with a {o}.", "we see a {o}.",
    "a photo showing a {o}.", "only a {o}.",
)
MULTI_TEMPLATES: tuple[str, ...] = (
    "{L}.", "a scene with {L}.", "there is {L}.", "this image shows {L}.", "a picture of {L}.",
    "we see {L}.", "{L}, nothing else.", "a photo with {L}.",
)
PROMPT_TEMPLATES: tuple[str, ...] = (
    "a {c}.", "a photo of a {c}.", "there is a {c}.", "a picture of a {c}.", "an image with a {c}.",
    "a small {c}.", "a large {c}.", "a {c} in the center.",
)

SPLITS = {"train": 0, "test": 1, "zeroshot": 2, "stories": 3, "val": 4}


@dataclass(frozen=True)
class WorldObject:
    shape: str
    colour: str
    size: str
    cell: int  # 0..8, row-major 3x3 grid


@dataclass(frozen=True)
class Scene:
    objects: tuple[WorldObject, ...]

    @property
    def label(self) -> str:
        """Class name of the first object, ``"<colour> <shape>"`` (the zero-shot label set)."""
        return class_name(self.objects[0].colour, self.objects[0].shape)


@dataclass(frozen=True)
class WorldConfig:
    """Knobs of the built-in world. Every field changes what is generated, so all of it is saved with data."""

    seed: int = 0
    image_size: int = 32
    max_objects: int = 3
    num_heldout: int = 8  # colour-shape combinations never seen in training
    caption_mode: str = "literal"  # "literal" | "weak"
    mismatch_fraction: float = 0.0  # "noisy" mode: this fraction of pairs gets another scene's caption
    background_noise: float = 6.0  # std of pixel noise on the background (0..255 scale)
    image_noise: float = 0.0  # extra std of pixel noise over the whole image: the image modality's knob
    audio_sample_rate: int = 16000
    audio_seconds: float = 0.5
    audio_snr_db: float = 20.0  # the audio modality's knob: lower is harder
    weak_drop: float = 0.5  # weak mode: probability of dropping each optional attribute
    # Literal captions name an object's place with this probability. Always naming it makes colour + place
    # enough to tell most images in a batch apart, and contrastive training then never needs to learn shape
    # (a shortcut); leaving it out half the time puts shape back into the hard negatives.
    position_prob: float = 0.5
    object_probs: tuple[float, ...] = field(default=(0.4, 0.35, 0.25))

    def __post_init__(self) -> None:
        if not 16 <= self.image_size <= 256:
            raise ValueError(f"image_size must be in [16, 256], got {self.image_size}")
        if not 1 <= self.max_objects <= 3:
            raise ValueError(f"max_objects must be in [1, 3], got {self.max_objects}")
        if not 0 <= self.num_heldout <= 32:
            raise ValueError(f"num_heldout must be in [0, 32], got {self.num_heldout}")
        if self.caption_mode not in ("literal", "weak"):
            raise ValueError(f"caption_mode must be 'literal' or 'weak', got {self.caption_mode!r}")
        if not 0 <= self.mismatch_fraction <= 1:
            raise ValueError(f"mismatch_fraction must be in [0, 1], got {self.mismatch_fraction}")


def class_name(colour: str, shape: str) -> str:
    return f"{colour} {shape}"


def all_classes() -> list[str]:
    return [class_name(c, s) for c in COLOUR_NAMES for s in SHAPES]


def heldout_combinations(cfg: WorldConfig) -> frozenset[tuple[str, str]]:
    """Held-out (colour, shape) pairs: a few Latin-square diagonals, so every colour and every shape still
    occurs in training with most partners and is held out equally often."""
    combos: list[tuple[str, str]] = []
    n = len(COLOUR_NAMES)
    offset = 0
    while len(combos) < cfg.num_heldout:
        for i in range(n):
            if len(combos) == cfg.num_heldout:
                break
            combos.append((COLOUR_NAMES[i], SHAPES[(i + 3 + offset * 3) % len(SHAPES)]))
        offset += 1
    return frozenset(combos)


def sample_rng(cfg: WorldConfig, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, SPLITS[split], index])


def sample_scene(
    rng: np.random.Generator,
    cfg: WorldConfig,
    exclude: frozenset[tuple[str, str]] = frozenset(),
    num_objects: int | None = None,
) -> Scene:
    """A random scene with objects in distinct cells, avoiding the ``exclude`` colour-shape combinations."""
    if num_objects is None:
        probs = np.asarray(cfg.object_probs[: cfg.max_objects], dtype=np.float64)
        num_objects = int(rng.choice(len(probs), p=probs / probs.sum())) + 1
    cells = rng.choice(9, size=num_objects, replace=False)
    objects = []
    for cell in cells:
        while True:
            colour = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
            shape = SHAPES[rng.integers(len(SHAPES))]
            if (colour, shape) not in exclude:
                break
        objects.append(WorldObject(shape, colour, SIZES[rng.integers(2)], int(cell)))
    return Scene(tuple(objects))


# ----------------------------------------------------------------------------------------------------------
# Rendering


def _shape_polygon(shape: str, r: float, c: float, rot: float) -> list[tuple[float, float]]:
    def regular(n: int, radius: float, phase: float) -> list[tuple[float, float]]:
        return [(c + radius * math.cos(phase + rot + 2 * math.pi * k / n),
                 c + radius * math.sin(phase + rot + 2 * math.pi * k / n)) for k in range(n)]

    if shape == "square":
        return regular(4, r * 1.05, math.pi / 4)
    if shape == "triangle":
        # Shifted down by r/4 so its bounding box (not its centroid, which sits r/4 low) is centred in the
        # cell and the 1.2 r top vertex stays inside the mask.
        return [(x, y + r * 0.25) for x, y in regular(3, r * 1.2, -math.pi / 2)]
    if shape == "diamond":
        return [(c + x * math.cos(rot) - y * math.sin(rot), c + x * math.sin(rot) + y * math.cos(rot))
                for x, y in ((0, -r * 1.1), (r * 0.7, 0), (0, r * 1.1), (-r * 0.7, 0))]
    if shape == "star":
        pts = []
        for k in range(10):
            radius = r * 1.1 if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + rot + math.pi * k / 5
            pts.append((c + radius * math.cos(a), c + radius * math.sin(a)))
        return pts
    if shape == "cross":
        w = r * 0.36
        base = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w),
                (-r, -w), (-w, -w)]
        return [(c + x * math.cos(rot) - y * math.sin(rot), c + x * math.sin(rot) + y * math.cos(rot))
                for x, y in base]
    raise AssertionError(f"no polygon for {shape}")


@cache
def shape_mask(shape: str, diameter: int, variant: int) -> np.ndarray:
    """Anti-aliased alpha mask [diameter, diameter] in [0, 1], drawn at 4x and box-filtered down.

    ``variant`` (0..3) picks a small rotation, so shapes are not pixel-identical every time.
    """
    scale = 4
    big = diameter * scale
    img = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(img)
    c = (big - 1) / 2
    r = big * 0.46
    rot = (variant - 1.5) * 0.12
    if shape == "circle":
        draw.ellipse([c - r, c - r, c + r, c + r], fill=255)
    elif shape == "crescent":
        draw.ellipse([c - r, c - r, c + r, c + r], fill=255)
        shift = r * (0.8 + 0.1 * rot)  # the bite's offset varies a little with the variant
        draw.ellipse([c - r + shift, c - r - shift * 0.3, c + r + shift, c + r - shift * 0.3], fill=0)
    elif shape == "ring":
        draw.ellipse([c - r, c - r, c + r, c + r], fill=255)
        inner = r * 0.5
        draw.ellipse([c - inner, c - inner, c + inner, c + inner], fill=0)
    else:
        draw.polygon(_shape_polygon(shape, r, c, rot), fill=255)
    mask = np.asarray(img, dtype=np.float32).reshape(diameter, scale, diameter, scale).mean(axis=(1, 3))
    return mask / 255.0


def render_scene(scene: Scene, rng: np.random.Generator, cfg: WorldConfig,
                 colours: Mapping[str, tuple[int, int, int]] = COLOURS) -> np.ndarray:
    """Render ``scene`` to an ``[S, S, 3]`` uint8 image; ``colours`` maps colour names to the RGB drawn
    (a grey palette renders the scene without colour information, as the shortcut benchmark needs)."""
    s = cfg.image_size
    base = rng.uniform(25, 95)
    tint = rng.uniform(-8, 8, size=3)
    img = np.empty((s, s, 3), dtype=np.float32)
    img[...] = base + tint
    img += rng.normal(0.0, cfg.background_noise, size=(s, s, 3)).astype(np.float32)
    cell = s / 3
    for obj in scene.objects:
        # Small objects must stay legible (at 32 px a 0.26 fraction left 8 px stars and hexagons as blobs);
        # large ones may overlap a neighbouring cell slightly.
        frac = 0.33 if obj.size == "small" else 0.47
        diameter = max(5, int(round(s * frac * rng.uniform(0.92, 1.08))))
        mask = shape_mask(obj.shape, diameter, int(rng.integers(4)))
        row, col = divmod(obj.cell, 3)
        cy = (row + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        cx = (col + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        y0, x0 = int(round(cy - diameter / 2)), int(round(cx - diameter / 2))
        # Clip the mask to the canvas (large objects in edge cells may poke out).
        my0, mx0 = max(0, -y0), max(0, -x0)
        y1, x1 = min(s, y0 + diameter), min(s, x0 + diameter)
        y0, x0 = max(0, y0), max(0, x0)
        a = mask[my0 : my0 + (y1 - y0), mx0 : mx0 + (x1 - x0), None]
        colour = np.asarray(colours[obj.colour], dtype=np.float32) + rng.normal(0, 8, size=3)
        region = img[y0:y1, x0:x1]
        region *= 1.0 - a
        region += a * colour
    if cfg.image_noise > 0:
        img += rng.normal(0.0, cfg.image_noise, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------
# Language


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[rng.integers(len(options))]


def describe_object(obj: WorldObject, rng: np.random.Generator, with_cell: bool = True) -> str:
    words = [_pick(rng, SIZE_WORDS[obj.size]), _pick(rng, COLOUR_WORDS[obj.colour]),
             _pick(rng, SHAPE_WORDS[obj.shape])]
    phrase = " ".join(words)
    return f"{phrase} {_pick(rng, CELLS[obj.cell])}" if with_cell else phrase


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def literal_caption(scene: Scene, rng: np.random.Generator, position_prob: float = 1.0) -> str:
    """A caption that names every object's size, colour and shape, and its place with ``position_prob``."""
    with_cell = bool(rng.random() < position_prob)
    if len(scene.objects) == 1:
        obj = scene.objects[0]
        phrase = describe_object(obj, rng, with_cell=False)
        if not with_cell:
            return _pick(rng, PLAIN_TEMPLATES).format(o=phrase)
        cell = _pick(rng, CELLS[obj.cell])
        return _pick(rng, SINGLE_TEMPLATES).format(o=phrase, p=cell, P=cell[0].upper() + cell[1:])
    order = rng.permutation(len(scene.objects))
    parts = ["a " + describe_object(scene.objects[i], rng, with_cell) for i in order]
    return _pick(rng, MULTI_TEMPLATES).format(L=_join(parts))


def weak_caption(scene: Scene, rng: np.random.Generator, drop: float) -> str:
    """Loosely related text, as found around web images (BriVL's weak semantic correlation): mentions only
    some objects and attributes, speaks in families ("something warm and round"), adds unrelated words."""
    keep = [o for o in scene.objects if rng.random() > drop] or [scene.objects[rng.integers(len(scene.objects))]]
    parts = []
    for obj in keep:
        style = rng.integers(3)
        if style == 0:
            words = []
            if rng.random() > drop:
                words.append(_pick(rng, SIZE_WORDS[obj.size]))
            words.append(_pick(rng, COLOUR_WORDS[obj.colour]) if rng.random() > drop / 2
                         else COLOUR_FAMILY[obj.colour])
            words.append(_pick(rng, SHAPE_WORDS[obj.shape]))
            phrase = "a " + " ".join(words)
        elif style == 1:
            phrase = f"something {COLOUR_FAMILY[obj.colour]} and {SHAPE_FAMILY[obj.shape]}"
        else:
            phrase = f"a {_pick(rng, COLOUR_WORDS[obj.colour])} thing"
        if rng.random() > drop:
            phrase += " " + _pick(rng, CELLS[obj.cell])
        parts.append(phrase)
    text = _join(parts)
    if rng.random() < 0.7:
        text = f"{text} {_pick(rng, FILLERS)}" if rng.random() < 0.5 else f"{_pick(rng, FILLERS)}, {text}"
    return text + "."


# ----------------------------------------------------------------------------------------------------------
# Audio

# Fundamental per shape (log-spaced, ~2.5 semitones apart would be too close for 25 ms frames; use ~5).
_SHAPE_F0 = {s: 180.0 * (2 ** (5 * i / 12)) for i, s in enumerate(SHAPES)}
# Timbre per colour: relative amplitudes of harmonics 1..6 (distinct spectral envelopes).
_COLOUR_HARMONICS = {
    "red": (1.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    "green": (1.0, 0.8, 0.0, 0.0, 0.0, 0.0),
    "blue": (1.0, 0.0, 0.8, 0.0, 0.0, 0.0),
    "yellow": (1.0, 0.0, 0.0, 0.8, 0.0, 0.0),
    "purple": (1.0, 0.6, 0.6, 0.0, 0.0, 0.0),
    "orange": (1.0, 0.0, 0.6, 0.0, 0.6, 0.0),
    "cyan": (0.4, 0.0, 0.0, 0.0, 0.0, 1.0),
    "pink": (1.0, 0.5, 0.4, 0.3, 0.2, 0.1),
}


def synthesize_audio(scene: Scene, rng: np.random.Generator, cfg: WorldConfig) -> np.ndarray:
    """A mono clip in [-1, 1]: each object is a harmonic tone (shape -> pitch, colour -> harmonic
    envelope, size -> loudness), starting later the further right its column is; white noise at
    ``audio_snr_db`` makes the modality as hard as wanted."""
    sr = cfg.audio_sample_rate
    n = int(sr * cfg.audio_seconds)
    t = np.arange(n, dtype=np.float32) / sr
    clip = np.zeros(n, dtype=np.float32)
    for obj in scene.objects:
        f0 = _SHAPE_F0[obj.shape] * rng.uniform(0.985, 1.015)
        onset = (obj.cell % 3) * 0.1 * cfg.audio_seconds + rng.uniform(0, 0.03) * cfg.audio_seconds
        env = np.clip((t - onset) / 0.01, 0, 1) * np.exp(-np.clip(t - onset, 0, None) * 3.0)
        tone = np.zeros(n, dtype=np.float32)
        for h, amp in enumerate(_COLOUR_HARMONICS[obj.colour], start=1):
            if amp > 0 and f0 * h < sr / 2:
                tone += amp * np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 2 * np.pi)).astype(np.float32)
        loud = 0.5 if obj.size == "large" else 0.25
        clip += loud * env.astype(np.float32) * tone
    signal_power = float(np.mean(clip**2)) + 1e-8
    noise_std = math.sqrt(signal_power / (10 ** (cfg.audio_snr_db / 10)))
    clip += rng.normal(0.0, noise_std, size=n).astype(np.float32)
    peak = float(np.abs(clip).max()) + 1e-6
    return (clip / max(peak, 1.0)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# Samples


@dataclass
class WorldSample:
    key: str
    image: np.ndarray  # [S, S, 3] uint8
    caption: str
    scene: Scene
    label: str
    heldout: bool
    audio: np.ndarray | None = None
    matched: bool = True  # False: a noisy pair, the caption describes another scene (the ground truth of CapFilt)

    def meta(self) -> dict:
        return {
            "caption": self.caption,
            "label": self.label,
            "heldout": self.heldout,
            "matched": self.matched,
            "objects": [vars(o) for o in self.scene.objects],
        }


def scene_from_meta(meta: dict) -> Scene | None:
    """The scene a world sample's json describes (``objects``), or ``None`` if it has none (not a world split)."""
    try:
        return Scene(tuple(WorldObject(o["shape"], o["colour"], o["size"], int(o["cell"])) for o in meta["objects"]))
    except (KeyError, TypeError, ValueError):
        return None


class World:
    """Random access to the built-in world: ``world.pair("train", i)`` is the same on every call."""

    def __init__(self, cfg: WorldConfig | None = None) -> None:
        self.cfg = cfg or WorldConfig()
        self.heldout = heldout_combinations(self.cfg)
        self.classes = all_classes()

    def _caption(self, scene: Scene, rng: np.random.Generator) -> str:
        if self.cfg.caption_mode == "weak":
            return weak_caption(scene, rng, self.cfg.weak_drop)
        return literal_caption(scene, rng, self.cfg.position_prob)

    def pair(self, split: str, index: int, with_audio: bool = False) -> WorldSample:
        """Image-caption pair ``index`` of ``split``. Training scenes avoid held-out combinations; other
        splits draw from every combination."""
        rng = sample_rng(self.cfg, split, index)
        exclude = self.heldout if split in ("train", "val") else frozenset()
        scene = sample_scene(rng, self.cfg, exclude)
        image = render_scene(scene, rng, self.cfg)
        caption_scene = scene
        if self.cfg.mismatch_fraction > 0 and rng.random() < self.cfg.mismatch_fraction:
            caption_scene = sample_scene(rng, self.cfg, exclude)  # noisy mode: a caption of another scene
        caption = self._caption(caption_scene, rng)
        audio = synthesize_audio(scene, rng, self.cfg) if with_audio else None
        first = scene.objects[0]
        return WorldSample(f"{split}-{index:08d}", image, caption, scene, scene.label,
                           (first.colour, first.shape) in self.heldout, audio, caption_scene is scene)

    def labelled(self, index: int, with_audio: bool = False) -> WorldSample:
        """Single-object image ``index`` of the zero-shot split; classes cycle so every class is equally
        represented, held-out combinations included."""
        rng = sample_rng(self.cfg, "zeroshot", index)
        colour, shape = self.classes[index % len(self.classes)].split(" ")
        obj = WorldObject(shape, colour, SIZES[rng.integers(2)], int(rng.integers(9)))
        scene = Scene((obj,))
        image = render_scene(scene, rng, self.cfg)
        caption = literal_caption(scene, rng, self.cfg.position_prob)
        audio = synthesize_audio(scene, rng, self.cfg) if with_audio else None
        return WorldSample(f"zeroshot-{index:08d}", image, caption, scene, scene.label,
                           (colour, shape) in self.heldout, audio)

    def story(self, index: int, steps: int = 4) -> dict:
        """An interleaved document (OBELICS-style aligned ``texts``/``images`` lists with ``None`` gaps):
        a first scene, then events (move, recolour, appear, vanish), each sentence followed by the image of
        the new state. Later images are predictable from the earlier text and images, which is what LCL
        needs."""
        rng = sample_rng(self.cfg, "stories", index)
        scene = sample_scene(rng, self.cfg, self.heldout, num_objects=int(rng.integers(1, 3)))
        texts: list[str | None] = [literal_caption(scene, rng), None]
        images: list[np.ndarray | None] = [None, render_scene(scene, rng, self.cfg)]
        for _ in range(steps - 1):
            scene, sentence = _story_event(scene, rng, self.heldout)
            texts += [sentence, None]
            images += [None, render_scene(scene, rng, self.cfg)]
        return {"key": f"story-{index:08d}", "texts": texts, "images": images}


def _story_event(scene: Scene, rng: np.random.Generator, exclude: frozenset) -> tuple[Scene, str]:
    objs = list(scene.objects)
    free = [c for c in range(9) if c not in {o.cell for o in objs}]
    kind = rng.integers(4)
    i = int(rng.integers(len(objs)))
    name = f"the {objs[i].colour} {objs[i].shape}"
    if kind == 0 and free:
        cell = int(rng.choice(free))
        objs[i] = WorldObject(objs[i].shape, objs[i].colour, objs[i].size, cell)
        return Scene(tuple(objs)), f"then {name} moves; now it is {_pick(rng, CELLS[cell])}."
    if kind == 1:
        options = [c for c in COLOUR_NAMES if c != objs[i].colour and (c, objs[i].shape) not in exclude]
        colour = options[rng.integers(len(options))]
        objs[i] = WorldObject(objs[i].shape, colour, objs[i].size, objs[i].cell)
        return Scene(tuple(objs)), f"then {name} turns {colour}."
    if kind == 2 and free and len(objs) < 3:
        new = sample_scene(rng, WorldConfig(max_objects=1), exclude, num_objects=1).objects[0]
        new = WorldObject(new.shape, new.colour, new.size, int(rng.choice(free)))
        return Scene((*objs, new)), f"then a {describe_object(new, rng)} appears."
    if len(objs) > 1:
        del objs[i]
        return Scene(tuple(objs)), f"then {name} disappears."
    size = "large" if objs[i].size == "small" else "small"
    objs[i] = WorldObject(objs[i].shape, objs[i].colour, size, objs[i].cell)
    return Scene(tuple(objs)), f"then {name} becomes {size}."
