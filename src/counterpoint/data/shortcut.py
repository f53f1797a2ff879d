"""The shortcut benchmark: coloured-and-grey shapes, one modality predictive at train time only.

In the style of Colored-and-gray-MNIST (Wu et al., "Characterizing and overcoming the greedy nature of
learning in multi-modal deep neural networks", ICML 2022; the colour shortcut is Kim et al.'s Colored MNIST,
"Learning Not to Learn", CVPR 2019), on the built-in world's shapes instead of digits, so it is generated
here in seconds and needs no download. The class is a shape; every sample has two modalities:

* ``coloured``: uint8 ``[N, 3, S, S]``, the class shape drawn in a colour. In the training split a fraction
  ``shortcut`` of samples use the *class colour* (class ``k`` <-> ``COLOUR_NAMES[k]``) and the rest one of the
  other colours, uniformly; in val and test every colour is uniform. Colour is thus a near-perfect and much
  easier cue at train time that carries nothing at test time, where only the shape in it still helps.
* ``grey``: uint8 ``[N, 1, S, S]``, the same class rendered from an independent scene sample (own size,
  place, rotation, background) in a random grey level: the real signal, the same at train and test.

A model that leans on the easy modality learns the colour and leaves the grey encoder under-trained; its test
accuracy then shows it. The validation split follows the test distribution, so model selection rewards
models that did not take the shortcut.

Every sample is a pure function of ``(seed, split, index)``; labels cycle through the classes, so each split
is exactly balanced.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from counterpoint.data.multimodal import SPLITS, ModalDataset, ModalSplit
from counterpoint.data.world import COLOUR_NAMES, SHAPES, SIZES, Scene, WorldConfig, WorldObject, render_scene

# Grey levels of the grey modality's shape: always well above the world's background (25..103).
_GREY_RANGE = (150.0, 240.0)
_STREAM = 0x5C  # keeps this generator's random streams apart from the world's, which use 3-entry seeds


@dataclass(frozen=True)
class ShortcutConfig:
    """Knobs of the shortcut benchmark; saved with the dataset (``info["config"]``)."""

    seed: int = 0  # the generated samples follow from it
    train: int = 6000  # training samples
    val: int = 1000  # validation samples (random colours: the shortcut is gone)
    test: int = 2000  # test samples (random colours)
    num_classes: int = 8  # the first ``num_classes`` shapes of the world
    shortcut: float = 1.0  # fraction of training samples whose coloured image has the class colour
    noise: float = 0.0  # std of extra pixel noise on both images (0..255 scale): hardness of the shapes
    image_size: int = 32  # pixels per side of both images

    def __post_init__(self) -> None:
        if not 2 <= self.num_classes <= len(SHAPES):
            raise ValueError(f"num_classes must be in [2, {len(SHAPES)}], got {self.num_classes}")
        if not 0.0 <= self.shortcut <= 1.0:
            raise ValueError(f"shortcut must be in [0, 1], got {self.shortcut}")
        if self.noise < 0:
            raise ValueError(f"noise must be >= 0, got {self.noise}")
        if not 16 <= self.image_size <= 256:
            raise ValueError(f"image_size must be in [16, 256], got {self.image_size}")
        for split in SPLITS:
            if getattr(self, split) < 1:
                raise ValueError(f"{split} must be at least 1 sample, got {getattr(self, split)}")


def class_colours(num_classes: int) -> dict[str, str]:
    """The train-time shortcut: class (shape) name -> its colour name."""
    return {SHAPES[k]: COLOUR_NAMES[k] for k in range(num_classes)}


def _scene(shape: str, colour: str, rng: np.random.Generator) -> Scene:
    return Scene((WorldObject(shape, colour, SIZES[rng.integers(len(SIZES))], int(rng.integers(9))),))


def shortcut_sample(cfg: ShortcutConfig, split: str, index: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Sample ``index`` of ``split``: (coloured ``[3, S, S]``, grey ``[1, S, S]``, label, colour index)."""
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split), index, _STREAM])
    wcfg = WorldConfig(image_size=cfg.image_size, image_noise=cfg.noise)
    label = index % cfg.num_classes
    if split == "train" and rng.random() < cfg.shortcut:
        colour = label
    elif split == "train":  # off the shortcut: any colour but the class's, so agreement is exactly `shortcut`
        colour = int(rng.integers(len(COLOUR_NAMES) - 1))
        colour += colour >= label
    else:
        colour = int(rng.integers(len(COLOUR_NAMES)))
    shape = SHAPES[label]
    coloured = render_scene(_scene(shape, COLOUR_NAMES[colour], rng), rng, wcfg)  # [S, S, 3]
    level = rng.uniform(*_GREY_RANGE)
    grey = render_scene(_scene(shape, "grey", rng), rng, wcfg, {"grey": (level, level, level)})  # [S, S, 3]
    grey = grey.mean(axis=2, dtype=np.float32).round().astype(np.uint8)  # [S, S]
    return coloured.transpose(2, 0, 1), grey[None], label, colour


def make_shortcut(cfg: ShortcutConfig = ShortcutConfig()) -> ModalDataset:
    """Generate the train/val/test splits (5-6k samples/s on one core at 32 px; benchmarks/bench_avdata.py)."""
    s = cfg.image_size
    splits, agreement = {}, {}
    for split in SPLITS:
        n = getattr(cfg, split)
        coloured = np.empty((n, 3, s, s), dtype=np.uint8)
        grey = np.empty((n, 1, s, s), dtype=np.uint8)
        labels = np.empty(n, dtype=np.int64)
        colours = np.empty(n, dtype=np.int64)
        for i in range(n):
            coloured[i], grey[i], labels[i], colours[i] = shortcut_sample(cfg, split, i)
        agreement[split] = float((colours == labels).mean())
        splits[split] = ModalSplit({"coloured": torch.from_numpy(coloured), "grey": torch.from_numpy(grey)},
                                   torch.from_numpy(labels))
    info = {"config": asdict(cfg), "class_colours": class_colours(cfg.num_classes),
            "colour_class_agreement": agreement}
    return ModalDataset("shortcut", list(SHAPES[: cfg.num_classes]), splits, info)
