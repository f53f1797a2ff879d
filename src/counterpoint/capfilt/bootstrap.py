"""Bootstrapping noisy pairs (BLIP's CapFilt): the captioner writes a synthetic caption for every image by
nucleus sampling, the filter's matching head scores the original and the synthetic caption against the image,
and every caption scoring below the threshold is dropped.

The kept pairs are written as WebDataset shards: an image keeps its own bytes and appears once per kept
caption (the original as ``KEY``, the synthetic one as ``KEY-syn``); an image with no caption left is dropped.
Each sample's json records where its caption came from and its match probability.

On the built-in world every noisy pair carries the truth (json ``matched`` and the scene's ``objects``): the
filter is then scored at removing the mismatched originals (precision and recall), and the synthetic captions'
attributes against the scenes.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import counterpoint
from counterpoint.capfilt.config import BootstrapConfig
from counterpoint.data.readers import (
    SkipStats,
    decode_members,
    iter_tar_groups,
    metadata,
    tar_files,
    to_square_array,
)
from counterpoint.data.shards import shard_sizes
from counterpoint.data.transforms import normalize
from counterpoint.data.world import Scene, scene_from_meta
from counterpoint.data.writers import ShardWriter
from counterpoint.errors import DataError
from counterpoint.evaluate.caption_attributes import attribute_scores
from counterpoint.train.loop import load_run_model
from counterpoint.visualize.grid import save_pictures

SYNTHETIC_SUFFIX = "-syn"


@dataclass
class _Batch:
    keys: list[str] = field(default_factory=list)
    members: list[dict[str, bytes]] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    metas: list[dict[str, Any]] = field(default_factory=list)


def _batches(path: str, batch_size: int, image_size: int, skips: SkipStats) -> Iterator[_Batch]:
    """Usable samples of the shards at ``path`` in order, ``batch_size`` at a time; bad ones are counted."""
    batch = _Batch()
    for tar_path in tar_files(path):
        for key, members in iter_tar_groups(tar_path, skips):
            sample = decode_members(key, members, "txt", f"{tar_path.name}:{key}", skips)
            if sample is None:
                continue
            batch.keys.append(key)
            batch.members.append(members)
            batch.images.append(to_square_array(sample.image, image_size))
            batch.captions.append(sample.caption)
            batch.metas.append(metadata(members))  # decode_members has checked it
            if len(batch.keys) == batch_size:
                yield batch
                batch = _Batch()
    if batch.keys:
        yield batch


@torch.no_grad()
def match_probability(model: torch.nn.Module, image_tokens: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``p(match)`` of the filter's 2-way matching head for aligned image tokens and texts."""
    return model.match_logits(image_tokens, tokens).float().softmax(dim=1)[:, 1].cpu()


def removal_scores(matched: list[bool], kept: list[bool]) -> dict[str, float]:
    """The filter as a detector of mismatched originals: precision and recall of the removed ones."""
    removed = [not k for k in kept]
    hits = sum(r and not m for r, m in zip(removed, matched))
    n_removed, n_mismatched = sum(removed), sum(not m for m in matched)
    kept_mismatched = sum(k and not m for k, m in zip(kept, matched))
    return {"mismatched": n_mismatched, "removed": n_removed, "removed_mismatched": hits,
            "precision": hits / n_removed if n_removed else 0.0,
            "recall": hits / n_mismatched if n_mismatched else 0.0,
            "noise_before": n_mismatched / len(matched) if matched else 0.0,
            "noise_after": kept_mismatched / sum(kept) if sum(kept) else 0.0}


THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))  # the filter's precision / recall curve


def removal_curve(matched_p: list[float], mismatched_p: list[float]) -> list[dict[str, float]]:
    """Removal precision and recall of the mismatched originals at every threshold of ``THRESHOLDS`` (a caption
    is removed when its p(match) is below the threshold): what choosing the threshold trades."""
    good, bad = np.asarray(matched_p), np.asarray(mismatched_p)
    curve = []
    for t in THRESHOLDS:
        hits, removed = int((bad < t).sum()), int((bad < t).sum() + (good < t).sum())
        curve.append({"threshold": t, "precision": hits / removed if removed else 0.0,
                      "recall": hits / len(bad) if len(bad) else 0.0, "kept": len(good) + len(bad) - removed})
    return curve


def _plot_filter(scores: dict[str, list[float]], curve: list[dict[str, float]] | None, threshold: float,
                 path: Path) -> None:
    """The filter's p(match) histogram per kind of caption and, with the truth, its precision / recall at
    removing mismatched originals against the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if curve else 1, figsize=(11 if curve else 6.4, 3.8), squeeze=False)
    ax = axes[0, 0]
    bins = np.linspace(0, 1, 41)
    for label, values in scores.items():
        if values:
            ax.hist(values, bins=bins, alpha=0.55, label=f"{label} ({len(values)})")
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    ax.set_xlabel("filter's p(match)")
    ax.set_ylabel("captions")
    ax.set_yscale("log")
    ax.set_title("What the filter thinks of each caption")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if curve:
        ax = axes[0, 1]
        ts = [c["threshold"] for c in curve]
        ax.plot(ts, [c["precision"] for c in curve], marker="o", markersize=3, label="precision")
        ax.plot(ts, [c["recall"] for c in curve], marker="o", markersize=3, label="recall")
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1)
        ax.set_xlabel("threshold (remove a caption below it)")
        ax.set_ylim(0, 1.02)
        ax.set_title("Removing mismatched originals, against the truth")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bootstrap(captioner_dir: str | Path, filter_dir: str | Path, noisy: str, out_dir: str | Path,
              cfg: BootstrapConfig, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Caption, filter and write ``noisy`` (WebDataset shards) to ``out_dir/shards``; writes and returns
    ``out_dir/bootstrap.json`` (counts, skips, the truth scores when the data has them, seconds) and the
    report's pictures (``filter.png``, ``examples/``)."""
    if not tar_files(noisy):
        raise DataError(f"CapFilt reads WebDataset shards; no .tar files at '{noisy}'")
    t0 = time.perf_counter()
    out = Path(out_dir)
    shutil.rmtree(out / "shards", ignore_errors=True)  # what an interrupted bootstrap left
    out.mkdir(parents=True, exist_ok=True)
    captioner, tokenizer, _ = load_run_model(captioner_dir)
    filt, filter_tokenizer, _ = load_run_model(filter_dir)
    for role, model in (("captioner", captioner), ("filter", filt)):
        if not hasattr(model, "caption_logits" if role == "captioner" else "match_logits"):
            raise DataError(f"the {role} run '{captioner_dir if role == 'captioner' else filter_dir}' is not a BLIP "
                            f"model (objective.name=blip)")
    skips = SkipStats()
    matched: list[bool] = []
    kept_original: list[bool] = []
    scores: dict[str, list[float]] = {"original, matched": [], "original, mismatched": [], "original": [],
                                      "synthetic": []}
    synthetic_all: list[str] = []
    scenes: list[Scene | None] = []
    counts = {"images": 0, "original_kept": 0, "synthetic_kept": 0, "synthetic_empty": 0, "images_kept": 0}
    examples: list[tuple[np.ndarray, str, str]] = []
    total = sum(shard_sizes([str(p) for p in tar_files(noisy)]))
    bar = tqdm(total=total, unit=" images", desc="capfilt/bootstrap", disable=not progress, dynamic_ncols=True)
    with ShardWriter(out / "shards") as writer:
        for index, batch in enumerate(_batches(noisy, cfg.batch_size, captioner.image_size, skips)):
            images = torch.from_numpy(np.stack(batch.images)).permute(0, 3, 1, 2).contiguous()
            synthetic = counterpoint.caption(captioner, tokenizer, images, top_p=cfg.top_p,
                                             max_tokens=cfg.max_tokens, seed=seed * 1_000_003 + index,
                                             with_prompt=False)
            with torch.no_grad():
                image_tokens = filt.image_tokens(normalize(images))
            p_original = match_probability(filt, image_tokens, filter_tokenizer(batch.captions))
            p_synthetic = match_probability(filt, image_tokens, filter_tokenizer(synthetic))
            for i, key in enumerate(batch.keys):
                keep_o = bool(p_original[i] >= cfg.threshold)
                keep_s = cfg.synthetic and bool(synthetic[i].strip()) and bool(p_synthetic[i] >= cfg.threshold)
                counts["synthetic_empty"] += not synthetic[i].strip()
                image_ext = next(ext for ext in batch.members[i] if ext not in ("txt", "json"))
                image_bytes = batch.members[i][image_ext]
                for kept, caption, p, suffix, source in ((keep_o, batch.captions[i], p_original[i], "", "original"),
                                                         (keep_s, synthetic[i], p_synthetic[i], SYNTHETIC_SUFFIX,
                                                          "synthetic")):
                    if kept:
                        meta = {**batch.metas[i], "caption": caption,
                                "capfilt": {"source": source, "p_match": round(float(p), 4)}}
                        writer.write_members(key + suffix, {image_ext: image_bytes, "txt": caption.encode("utf-8"),
                                                            "json": json.dumps(meta).encode("utf-8")})
                counts["original_kept"] += keep_o
                counts["synthetic_kept"] += keep_s
                counts["images_kept"] += keep_o or keep_s
                kept_original.append(keep_o)
                truth = batch.metas[i].get("matched")
                if isinstance(truth, bool):
                    matched.append(truth)
                    scores["original, matched" if truth else "original, mismatched"].append(float(p_original[i]))
                else:
                    scores["original"].append(float(p_original[i]))
                scores["synthetic"].append(float(p_synthetic[i]))
                synthetic_all.append(synthetic[i])
                scenes.append(scene_from_meta(batch.metas[i]))
                if len(examples) < cfg.examples:
                    examples.append((batch.images[i], f"[{'kept' if keep_o else 'dropped'} {p_original[i]:.2f}"
                                     f"{'' if truth is None else ', ' + ('true' if truth else 'mismatched')}] "
                                     f"{batch.captions[i]}",
                                     f"[{'kept' if keep_s else 'dropped'} {p_synthetic[i]:.2f}] {synthetic[i]}"))
            counts["images"] += len(batch.keys)
            bar.update(len(batch.keys))
    bar.close()
    if counts["images"] == 0:
        raise DataError(f"no usable pairs at '{noisy}' ({skips.as_dict()})")
    originals = [p for k, v in scores.items() if k != "synthetic" for p in v]
    quantiles = {name: {f"q{q}": round(float(np.quantile(values, q / 100)), 4) for q in (10, 25, 50, 75, 90)}
                 for name, values in (("original", originals), ("synthetic", scores["synthetic"]))}
    result: dict[str, Any] = {"noisy": str(noisy), "captioner": str(captioner_dir), "filter": str(filter_dir),
                              "settings": vars(cfg) | {"seed": seed}, "counts": counts,
                              "pairs_written": counts["original_kept"] + counts["synthetic_kept"],
                              "p_match": quantiles, "skipped": skips.as_dict()}
    if result["pairs_written"] == 0:
        raise DataError(f"the filter kept no caption of {counts['images']} images at bootstrap.threshold="
                        f"{cfg.threshold:g} (its p(match) quantiles: originals {quantiles['original']}); lower the "
                        f"threshold or train the filter longer")
    curve = None
    if len(matched) == counts["images"]:
        curve = removal_curve(scores["original, matched"], scores["original, mismatched"])
        result["filter_vs_truth"] = {**removal_scores(matched, kept_original), "by_threshold": curve}
    if all(s is not None for s in scenes):
        result["synthetic_attributes"] = attribute_scores(synthetic_all, scenes)
    _plot_filter({k: v for k, v in scores.items() if v}, curve, cfg.threshold, out / "filter.png")
    if examples:
        pictures = torch.from_numpy(np.stack([e[0] for e in examples])).permute(0, 3, 1, 2)
        save_pictures(pictures, [e[1] for e in examples], out / "examples" / "original", zoom=6,
                      title="original captions: the filter's decision and p(match)")
        save_pictures(pictures, [e[2] for e in examples], out / "examples" / "synthetic", zoom=6,
                      title="synthetic captions (nucleus sampling): the filter's decision and p(match)")
    result["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "bootstrap.json").write_text(json.dumps(result, indent=2))
    return result
