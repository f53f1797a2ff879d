"""The shortcut benchmark: colour follows the class at train time at the configured rate (measured from the
pixels), is independent of it at val/test, and everything is a deterministic function of the seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from counterpoint.cli import main
from counterpoint.data.multimodal import ModalDataset
from counterpoint.data.shortcut import ShortcutConfig, class_colours, make_shortcut, shortcut_sample
from counterpoint.data.world import COLOUR_NAMES, COLOURS

pytestmark = pytest.mark.usefixtures("one_thread")

PALETTE = torch.tensor([COLOURS[c] for c in COLOUR_NAMES], dtype=torch.float32)  # [8, 3]


def measured_colours(images: torch.Tensor) -> torch.Tensor:
    """``[N, 3, S, S]`` uint8 -> ``[N]`` palette index of the drawn object, read from the pixels alone.

    The background is grey (channels within a few levels of each other) and every palette colour is
    saturated, so the object's core is the most saturated pixels; their median is matched to the palette.
    """
    x = images.float().flatten(2)  # [N, 3, S*S]
    saturation = x.max(dim=1).values - x.min(dim=1).values  # [N, S*S]
    core = saturation.topk(6, dim=1).indices  # [N, 6]
    rgb = torch.gather(x, 2, core[:, None].expand(-1, 3, -1)).median(dim=2).values  # [N, 3]
    return torch.cdist(rgb, PALETTE).argmin(dim=1)


def agreement_bounds(p: float, n: int) -> tuple[float, float]:
    """A 5-sigma binomial interval: a correct generator falls outside it about once in two million runs."""
    sigma = (p * (1 - p) / n) ** 0.5
    return p - 5 * sigma, p + 5 * sigma


@pytest.fixture(scope="module")
def partial() -> ModalDataset:
    return make_shortcut(ShortcutConfig(seed=3, train=800, val=200, test=800, shortcut=0.7))


def test_shortcut_holds_at_train_at_the_configured_rate(partial: ModalDataset) -> None:
    train = partial.splits["train"]
    colours = measured_colours(train.inputs["coloured"])
    rate = int((colours == train.labels).sum()) / len(train)
    assert rate == partial.info["colour_class_agreement"]["train"]  # the pixels say what the generator drew
    lo, hi = agreement_bounds(0.7, len(train))
    assert lo < rate < hi


def test_off_the_shortcut_the_colour_is_never_the_class_colour() -> None:
    train = make_shortcut(ShortcutConfig(seed=1, train=800, val=1, test=1, shortcut=0.0)).splits["train"]
    colours = measured_colours(train.inputs["coloured"])
    assert not (colours == train.labels).any()
    for k in range(8):  # ... and any of the other seven colours
        assert set(colours[train.labels == k].tolist()) == set(range(8)) - {k}


@pytest.mark.parametrize("split", ["val", "test"])
def test_colour_is_chance_at_val_and_test(partial: ModalDataset, split: str) -> None:
    data = partial.splits[split]
    colours = measured_colours(data.inputs["coloured"])
    rate = int((colours == data.labels).sum()) / len(data)
    assert rate == partial.info["colour_class_agreement"][split]
    lo, hi = agreement_bounds(1 / len(COLOUR_NAMES), len(data))
    assert lo < rate < hi


def test_default_sizes_and_balance() -> None:
    """(Generation speed is measured in benchmarks/bench_avdata.py.)"""
    ds = make_shortcut()
    assert ds.classes == ["circle", "square", "triangle", "star", "crescent", "cross", "diamond", "ring"]
    assert ds.info["class_colours"] == class_colours(8) and class_colours(8)["circle"] == "red"
    for split, size in (("train", 6000), ("val", 1000), ("test", 2000)):
        data = ds.splits[split]
        assert data.inputs["coloured"].shape == (size, 3, 32, 32) and data.inputs["coloured"].dtype == torch.uint8
        assert data.inputs["grey"].shape == (size, 1, 32, 32) and data.inputs["grey"].dtype == torch.uint8
        assert torch.equal(data.labels.bincount(), torch.full((8,), size // 8))
    train = ds.splits["train"]
    assert torch.equal(measured_colours(train.inputs["coloured"][:500]), train.labels[:500])  # shortcut = 1.0


def test_deterministic_from_the_seed_and_random_access() -> None:
    cfg = ShortcutConfig(seed=5, train=40, val=16, test=16, noise=12.0)
    a, b = make_shortcut(cfg), make_shortcut(cfg)
    other = make_shortcut(ShortcutConfig(seed=6, train=40, val=16, test=16, noise=12.0))
    for split in ("train", "val", "test"):
        for m in ("coloured", "grey"):
            assert torch.equal(a.splits[split].inputs[m], b.splits[split].inputs[m])
            assert not torch.equal(a.splits[split].inputs[m], other.splits[split].inputs[m])
        assert torch.equal(a.splits[split].labels, b.splits[split].labels)
    coloured, grey, label, _ = shortcut_sample(cfg, "val", 11)
    assert np.array_equal(coloured, a.splits["val"].inputs["coloured"][11].numpy())
    assert np.array_equal(grey, a.splits["val"].inputs["grey"][11].numpy())
    assert label == a.splits["val"].labels[11].item()


def test_grey_modality_carries_shape_not_colour(partial: ModalDataset) -> None:
    grey = partial.splits["train"].inputs["grey"].float().flatten(1)  # [N, S*S]
    # The shape is drawn in a grey level in [150, 240] on a background below ~110: always visible.
    bright = grey.max(dim=1).values
    assert (bright > 140).all()
    # Its level is drawn independently of the class: per-class means agree within sampling error.
    level = grey.topk(6, dim=1).values.median(dim=1).values  # [N]
    labels = partial.splits["train"].labels
    means = torch.stack([level[labels == k].mean() for k in range(len(partial.classes))])
    assert means.max() - means.min() < 12.0  # uniform on [150, 240] has std 26; 100 per class -> se 2.6
    # An independent scene: the grey image is not the coloured one with its colour removed.
    coloured = partial.splits["train"].inputs["coloured"].float()
    coloured_mask = (coloured.max(dim=1).values - coloured.min(dim=1).values > 60).flatten(1)
    grey_mask = grey > 140
    overlap = (coloured_mask & grey_mask).sum(1) / (coloured_mask | grey_mask).sum(1).clamp_min(1)
    assert overlap.mean() < 0.5


def test_config_validation() -> None:
    for kwargs, message in (({"shortcut": 1.5}, "shortcut must be in"), ({"num_classes": 9}, "num_classes"),
                            ({"noise": -1.0}, "noise must be"), ({"val": 0}, "val must be at least 1")):
        with pytest.raises(ValueError, match=message):
            ShortcutConfig(**kwargs)


def test_cli_make_shortcut(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "shortcut"
    assert main(["data", "make", "shortcut", "--out", str(out), "--train", "48", "--val", "8", "--test", "16",
                 "--num-classes", "4", "--shortcut", "0.5", "--seed", "2"]) == 0
    printed = capsys.readouterr().out
    assert "train 48, val 8, test 16; 4 classes" in printed and "colour = class colour in train" in printed
    back = ModalDataset.load(out)
    ref = make_shortcut(ShortcutConfig(seed=2, train=48, val=8, test=16, num_classes=4, shortcut=0.5))
    assert back.classes == ref.classes == ["circle", "square", "triangle", "star"]
    assert back.info["config"]["shortcut"] == 0.5
    for split in ("train", "val", "test"):
        assert torch.equal(back.splits[split].inputs["grey"], ref.splits[split].inputs["grey"])
        assert torch.equal(back.splits[split].labels, ref.splits[split].labels)
    assert main(["data", "make", "shortcut", "--out", str(out), "--shortcut", "2"]) == 2
    assert capsys.readouterr().err == "counterpoint: error: data make shortcut: shortcut must be in [0, 1], got 2.0\n"
