"""Throughput of the balanced-learning data on one core: shortcut-benchmark generation (samples/s of
``make_shortcut``, two 32 px renders per sample) and audio-visual feature precomputation (clips/s of
``read_av_layout`` on a generated CREMA-D-sized layout, with the fbank and frame shares timed apart).

The layout is written once to a temporary folder before timing: ``--clips`` clips of ``--seconds`` of 16 kHz
mono 16-bit audio and ``--frames-per-clip`` 480x360 JPEG frames (CREMA-D's video size; its frames extracted
at 1 fps give 2-4 per clip). Each case is timed ``--repeats`` times; the median and the best rate are
reported.

    python benchmarks/bench_avdata.py --samples 3000 --clips 100 --repeats 3
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from common import RESULTS, env_info, load_average, machine_line, markdown_table, median, write_json
from counterpoint.data.audio import write_wav
from counterpoint.data.av_layout import AVLayoutConfig, clip_fbank, clip_frames, read_av_layout
from counterpoint.data.shortcut import ShortcutConfig, make_shortcut


def write_layout(root: Path, clips: int, seconds: float, frames: int) -> None:
    """A CREMA-D-shaped tree: train.csv / test.csv (4:1), audio/<clip>.wav, visual/<clip>/frame_NN.jpg."""
    rng = np.random.default_rng(0)
    (root / "audio").mkdir(parents=True)
    names = [f"{1000 + i}_CLIP_{('ANG', 'HAP', 'SAD', 'NEU')[i % 4]}" for i in range(clips)]
    t = np.arange(int(seconds * 16000)) / 16000
    for i, name in enumerate(names):
        wave = 0.3 * np.sin(2 * np.pi * (120 + 5 * i) * t) + 0.05 * rng.standard_normal(t.size)
        write_wav(root / "audio" / f"{name}.wav", torch.from_numpy(wave), 16000)
        folder = root / "visual" / name
        folder.mkdir(parents=True)
        for j in range(frames):
            pixels = rng.integers(0, 256, (360 // 8, 480 // 8, 3), dtype=np.uint8)  # smooth after upscaling
            Image.fromarray(pixels).resize((480, 360), Image.BILINEAR).save(folder / f"frame_{j:02d}.jpg")
    rows = [f"{n},{n.rsplit('_', 1)[1]}" for n in names]
    split = len(rows) * 4 // 5
    (root / "train.csv").write_text("clip,label\n" + "\n".join(rows[:split]) + "\n")
    (root / "test.csv").write_text("clip,label\n" + "\n".join(rows[split:]) + "\n")


def rates(n: int, seconds: list[float]) -> dict[str, Any]:
    per_s = [n / s for s in seconds]
    return {"items_per_run": n, "seconds": seconds, "per_s_median": median(per_s), "per_s_best": max(per_s)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=3000, help="shortcut training samples per timed run")
    ap.add_argument("--clips", type=int, default=100, help="clips in the generated audio-visual layout")
    ap.add_argument("--seconds", type=float, default=2.5, help="audio seconds per clip (CREMA-D: ~2.5)")
    ap.add_argument("--frames-per-clip", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "avdata.json")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    meta = env_info()
    print(machine_line(meta), flush=True)
    load_before = load_average()
    records = []

    cfg = ShortcutConfig(train=args.samples, val=1, test=1)
    make_shortcut(ShortcutConfig(train=200, val=1, test=1))  # warm-up: fills the shape-mask cache
    seconds = []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        make_shortcut(ShortcutConfig(seed=r + 1, train=cfg.train, val=1, test=1))
        seconds.append(time.perf_counter() - t0)
    records.append({"case": "make_shortcut (32 px, 2 renders/sample)", "unit": "samples", **rates(cfg.train + 2,
                                                                                                     seconds)})
    print(f"{records[-1]['case']}: {records[-1]['per_s_median']:.0f} samples/s", flush=True)

    av_cfg = AVLayoutConfig()
    with tempfile.TemporaryDirectory(prefix="avbench-") as tmp:
        root = Path(tmp)
        write_layout(root, args.clips, args.seconds, args.frames_per_clip)
        read_av_layout(root, av_cfg)  # warm-up: page cache, fbank tables
        for case, fn in (
            ("read_av_layout (fbank + frames)", lambda: read_av_layout(root, av_cfg)),
            ("  fbank only (clip_fbank)", lambda: [clip_fbank(w, av_cfg) for w in sorted((root / "audio").iterdir())]),
            ("  frames only (clip_frames)",
             lambda: [clip_frames(d, av_cfg) for d in sorted((root / "visual").iterdir())]),
        ):
            seconds = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn()
                seconds.append(time.perf_counter() - t0)
            records.append({"case": case, "unit": "clips", **rates(args.clips, seconds)})
            print(f"{case}: {records[-1]['per_s_median']:.0f} clips/s", flush=True)
    load_after = load_average()

    rows = [(r["case"], r["unit"], r["items_per_run"], len(r["seconds"]), f"{r['per_s_median']:.0f}",
             f"{r['per_s_best']:.0f}", f"{1e3 / r['per_s_median']:.2f}") for r in records]
    md = markdown_table(["case (1 thread)", "unit", "per run", "runs", "per s (median)", "per s (best)",
                         "ms each"], rows)
    md += (f"\n\nAudio-visual layout: {args.clips} clips of {args.seconds} s 16 kHz audio and "
           f"{args.frames_per_clip} 480x360 JPEG frames; features at the defaults (T={av_cfg.audio_frames}, "
           f"{av_cfg.num_mel_bins} mel bins, K={av_cfg.frames} frames at {av_cfg.image_size} px). "
           f"Load average (1 min) before / after: {load_before[0]} / {load_after[0]}.")
    print()
    print(md)
    meta.update({"command_args": {k: str(v) for k, v in vars(args).items()}, "load_avg_before": load_before,
                 "load_avg_after": load_after})
    write_json(args.out, {"meta": meta, "records": records, "table_markdown": md})


if __name__ == "__main__":
    main()
