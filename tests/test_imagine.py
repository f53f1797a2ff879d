"""Imagination: the parameterisation, the transforms, and an optimisation that does what it claims (the
image's embedding turns towards the target), deterministically; the report's grid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import counterpoint
from counterpoint.models.presets import create_model
from counterpoint.train.loop import train
from counterpoint.visualize.grid import save_pictures
from counterpoint.visualize.imagine import FourierImage, imagine, robust_copies
from tests.conftest import tiny_config


def test_fourier_images_are_pixels_in_range_and_start_near_grey() -> None:
    """[n, 3, S, S] in (0, 1); a small initial spectrum is a nearly flat grey image."""
    image = FourierImage(2, 32, torch.Generator().manual_seed(0))
    x = image().detach()
    assert x.shape == (2, 3, 32, 32) and float(x.min()) > 0 and float(x.max()) < 1
    assert float((x - 0.5).abs().max()) < 0.05


def test_transformed_copies_keep_the_size_and_differ() -> None:
    """Each copy is a differently shifted / scaled / rotated view of the same image, cropped back."""
    x = torch.rand(2, 3, 32, 32)
    views = robust_copies(x, 3, torch.Generator().manual_seed(0), pad=4, jitter=3, jitter_after=1)
    assert views.shape == (6, 3, 32, 32)
    assert not torch.allclose(views[0], views[2])  # image 0, copies 1 and 2


@pytest.mark.usefixtures("one_thread")
def test_optimisation_turns_the_embedding_towards_the_target_deterministically() -> None:
    """The final cosine with each target is well above where it started, and the same seed gives the same
    picture."""
    torch.manual_seed(0)
    model = create_model("tiny-cnn", embed_dim=16).eval()
    target = torch.nn.functional.one_hot(torch.tensor([3, 7]), 16).float()
    start = imagine(model, target, steps=1, seed=1)[1]
    images, cosine = imagine(model, target, steps=60, seed=1)
    again, _ = imagine(model, target, steps=60, seed=1)
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 32, 32)
    assert torch.equal(images, again)
    assert float((cosine - start).min()) > 0.15, (start, cosine)  # every target gained (an untrained model)
    assert all(p.requires_grad for p in model.parameters())  # the model is given back as it was


def test_grid_writes_one_png_per_picture_and_a_labelled_grid(tmp_path: Path) -> None:
    """NN-<label>.png per picture (enlarged) and grid.png with the labels under the pictures."""
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    paths = save_pictures(images, ["a red star", "a blue circle", "unit 4"], tmp_path, zoom=2)
    assert [p.name for p in paths] == ["00-a-red-star.png", "01-a-blue-circle.png", "02-unit-4.png", "grid.png"]
    assert Image.open(paths[0]).size == (32, 32)
    assert Image.open(paths[-1]).size[0] > 3 * 32


@pytest.mark.slow
def test_report_shows_imagined_class_prompts(small_world: Path, tmp_path: Path) -> None:
    """With eval.imagine > 0 the run imagines that many class prompts (held-out first) into its report."""
    cfg = tiny_config(small_world, tmp_path / "run", max_steps=2)
    cfg.eval.imagine, cfg.eval.imagine_steps = 2, 3
    cfg.eval.retrieval = cfg.eval.linear_probe = False
    run = train(cfg)
    assert (run / "imagine" / "grid.png").is_file()
    report = (run / "report.md").read_text()
    assert "## Imagination" in report and "imagine/grid.png" in report
    imagined = json.loads((run / "eval.json").read_text())["imagine"]
    assert len(imagined["prompts"]) == len(imagined["cosine"]) == 2 and imagined["grid"] == "imagine/grid.png"
    model, tokenizer = counterpoint.load_checkpoint(run)
    pictures, cosine = counterpoint.imagine(model, tokenizer, "a red star", steps=2)
    assert pictures.shape == (1, 3, 32, 32) and cosine.shape == (1,)
