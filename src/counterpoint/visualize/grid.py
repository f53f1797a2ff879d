"""Pictures with their captions: one PNG per image and a labelled grid (PIL only)."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont


def _slug(text: str, i: int) -> str:
    return f"{i:02d}-" + (re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "image")


def save_pictures(images: torch.Tensor, labels: Sequence[str], out_dir: str | Path, zoom: int = 4,
                  columns: int = 8, title: str = "") -> list[Path]:
    """Write ``images`` (``[N, 3, S, S]`` uint8) as ``NN-<label>.png`` (enlarged ``zoom`` times, nearest) and
    ``grid.png`` with each label written under its picture; returns the paths, the grid last."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tiles = [Image.fromarray(img.permute(1, 2, 0).numpy()).resize((img.shape[-1] * zoom,) * 2, Image.NEAREST)
             for img in images]
    paths = []
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        path = out / f"{_slug(label, i)}.png"
        tile.save(path)
        paths.append(path)
    font = ImageFont.load_default()
    side = tiles[0].width
    chars = max(8, side // 6)  # the default font is ~6 px a character
    wrapped = [textwrap.wrap(label, chars)[:3] for label in labels]
    text_h = 12 * max(len(w) for w in wrapped) + 6
    cols = min(columns, len(tiles))
    rows = -(-len(tiles) // cols)
    head = 18 if title else 0
    grid = Image.new("RGB", (cols * (side + 8) + 8, head + rows * (side + text_h + 8) + 8), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((8, 4), title, fill="black", font=font)
    for i, (tile, lines) in enumerate(zip(tiles, wrapped)):
        x = 8 + (i % cols) * (side + 8)
        y = head + 8 + (i // cols) * (side + text_h + 8)
        grid.paste(tile, (x, y))
        for j, line in enumerate(lines):
            draw.text((x, y + side + 3 + 12 * j), line, fill="black", font=font)
    grid_path = out / "grid.png"
    grid.save(grid_path)
    return [*paths, grid_path]
