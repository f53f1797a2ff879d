"""The ``counterpoint`` command.

    counterpoint data make world --out data/world [--format wds|csv|folder] [--train N] ...
    counterpoint data make shortcut --out data/shortcut [--shortcut 1.0] [--noise 0] ...
    counterpoint data av-features ROOT --out data/cremad [--sample-rate 16000] [--frames 3] ...
    counterpoint train configs/clip_world.yaml [key=value ...] [--resume | --overwrite]
    counterpoint eval RUN_DIR [key=value ...]
    counterpoint balance train configs/balance_av.yaml [key=value ...] [--overwrite]
    counterpoint balance compare configs/balance_av.yaml [key=value ...] [--overwrite]
    counterpoint capfilt configs/capfilt_world.yaml [key=value ...] [--overwrite]

Both ``train`` and ``eval`` run unchanged under ``torchrun --nproc-per-node N`` (see ``train/distributed.py``).
A user mistake prints one line, ``counterpoint: error: ...``, and exits with code 2; no traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from counterpoint import __version__
from counterpoint.errors import UserError

if TYPE_CHECKING:
    from counterpoint.data.multimodal import ModalDataset


_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
                       errno.ENAMETOOLONG, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EFBIG}


EXAMPLES = """examples:
  counterpoint data make world --out data/world
  counterpoint train configs/clip_world.yaml
  counterpoint train configs/clip_world.yaml train.epochs=1 model.name=tiny-vit out_dir=runs/vit
  counterpoint train configs/clip_world.yaml --resume
  counterpoint eval runs/clip-world
  counterpoint eval runs/clip-world data.test=data/world/test --out runs/clip-world/evals/test
  counterpoint config show configs/clip_world.yaml train.lr=1e-3
  counterpoint imagine runs/clip-world "a red star" "a large blue circle at the top left" --out imagined
  counterpoint balance train configs/balance_av.yaml method.name=uniform
  counterpoint balance compare configs/balance_av.yaml
  counterpoint capfilt configs/capfilt_world.yaml
  counterpoint launch --nproc-per-node 2 -- train configs/clip_world.yaml
"""


def _cmd_data_make(args: argparse.Namespace) -> int:
    from counterpoint.data.make_world import make_world
    from counterpoint.data.world import WorldConfig

    if args.workers is not None and args.workers < 1:
        raise UserError(f"data make world: --workers must be >= 1, got {args.workers}")
    try:
        wcfg = WorldConfig(seed=args.seed, image_size=args.image_size, caption_mode=args.captions,
                           mismatch_fraction=args.mismatch, num_heldout=args.heldout,
                           position_prob=args.position_prob, audio_snr_db=args.audio_snr_db)
    except ValueError as exc:
        raise UserError(f"data make world: {exc}") from None
    info = make_world(args.out, wcfg, args.format, args.train, args.test, args.zeroshot, args.stories,
                      args.audio, args.image_format, progress=not args.quiet, overwrite=args.overwrite,
                      workers=args.workers)
    print(f"wrote the built-in world to {args.out} ({args.format}): "
          + ", ".join(f"{k} {v}" for k, v in info["splits"].items() if v)
          + f"; {len(info['classes'])} classes, {len(info['heldout'])} held out of training")
    return 0


def _write_modal(dataset: ModalDataset, out: str, seconds: float) -> None:
    """Save a :class:`ModalDataset` and print what it holds."""
    path = dataset.save(out)
    first = dataset.splits["train"]
    shapes = ", ".join(f"{m} {list(x.shape[1:])} {str(x.dtype).removeprefix('torch.')}"
                       for m, x in first.inputs.items())
    sizes = ", ".join(f"{s} {len(d)}" for s, d in dataset.splits.items())
    print(f"wrote {path} (+ .json) in {seconds:.1f} s: {sizes}; {len(dataset.classes)} classes; {shapes}")


def _cmd_data_shortcut(args: argparse.Namespace) -> int:
    from counterpoint.data.shortcut import ShortcutConfig, make_shortcut

    try:
        cfg = ShortcutConfig(seed=args.seed, train=args.train, val=args.val, test=args.test,
                             num_classes=args.num_classes, shortcut=args.shortcut, noise=args.noise,
                             image_size=args.image_size)
    except ValueError as exc:
        raise UserError(f"data make shortcut: {exc}") from None
    t0 = time.perf_counter()
    dataset = make_shortcut(cfg)
    _write_modal(dataset, args.out, time.perf_counter() - t0)
    agreement = dataset.info["colour_class_agreement"]
    print("colour = class colour in " + ", ".join(f"{s} {a:.1%}" for s, a in agreement.items()))
    return 0


def _cmd_data_documents(args: argparse.Namespace) -> int:
    from counterpoint.data.document_shards import write_document_shards
    from counterpoint.data.documents import detect_document_format, iter_documents
    from counterpoint.data.readers import SkipStats

    if args.docs_per_shard < 1:
        raise UserError(f"data documents: --docs-per-shard must be >= 1, got {args.docs_per_shard}")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"data documents: '{out}' is not empty; choose a new --out folder")
    fmt = detect_document_format(args.source)
    skips = SkipStats()
    n = write_document_shards(iter_documents(args.source, skips, args.seed), out, args.docs_per_shard,
                              args.image_format, progress=not args.quiet)
    print(f"wrote {n} documents ({fmt}) to {out}; skipped {skips.total}"
          + (": " + ", ".join(f"{r} {c}" for r, c in sorted(skips.counts.items())) if skips.total else ""))
    return 0


def _cmd_data_av_features(args: argparse.Namespace) -> int:
    from counterpoint.data.av_layout import AVLayoutConfig, read_av_layout

    try:
        cfg = AVLayoutConfig(split_file=args.split_file, audio_dir=args.audio_dir, audio_file=args.audio_file,
                             visual_dir=args.visual_dir, sample_rate=args.sample_rate, resample=args.resample,
                             num_mel_bins=args.num_mel_bins, audio_frames=args.audio_frames, frames=args.frames,
                             image_size=args.image_size, val_fraction=args.val_fraction, seed=args.seed)
    except ValueError as exc:
        raise UserError(f"data av-features: {exc}") from None
    t0 = time.perf_counter()
    dataset = read_av_layout(args.root, cfg, progress=not args.quiet)
    _write_modal(dataset, args.out, time.perf_counter() - t0)
    skipped = dataset.info["skipped"]
    reasons = ", ".join(f"{r} {n}" for r, n in sorted(skipped["by_reason"].items()))
    print(f"skipped {skipped['total']} clips" + (f": {reasons}" if reasons else ""))
    for example in skipped["examples"][:5]:
        print(f"  {example}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from counterpoint.config import load_config
    from counterpoint.train.distributed import is_main_process
    from counterpoint.train.loop import train

    cfg = load_config(args.config, args.overrides)
    run_dir = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if is_main_process():
        _print_summary(run_dir)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from counterpoint.config import load_config
    from counterpoint.train.distributed import distributed_session, is_main_process
    from counterpoint.train.loop import finalize_run, load_run_model

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"'{run_dir}' is not a run directory (no config.yaml); pass the out_dir of a training run")
    cfg = load_config(run_dir / "config.yaml", args.overrides)
    out = Path(args.out) if args.out else run_dir / "evals" / _slug(args.overrides) if args.overrides else run_dir
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file; name a folder")
    with distributed_session(cfg.train.device) as ctx:  # under torchrun the ranks share the evaluation
        model, tokenizer, meta = load_run_model(run_dir, ctx.device, expect=cfg.model)
        finalize_run(run_dir, model, tokenizer, cfg, ctx.device, meta["step"], meta.get("model_name", cfg.model.name),
                     out_dir=out)
    if is_main_process():
        _print_summary(out)
    return 0


def _slug(overrides: list[str]) -> str:
    """A folder name for an evaluation with ``overrides`` (``data.test=a/b.csv`` -> ``data.test=a_b.csv``)."""
    text = "_".join(overrides)
    return "".join(c if c.isalnum() or c in "._=-," else "_" for c in text)[:120]


def _cmd_imagine(args: argparse.Namespace) -> int:
    """Pictures of what texts, directions between texts, or embedding units mean to a trained model."""
    import torch

    from counterpoint.train.loop import load_run_model
    from counterpoint.visualize.grid import save_pictures
    from counterpoint.visualize.imagine import imagine, text_targets

    if not (args.texts or args.direction or args.unit):
        raise UserError("imagine: give texts to imagine, --direction A B, or --unit K")
    model, tokenizer, _ = load_run_model(args.run_dir)
    targets, labels = [], []
    if not hasattr(model, "encode_text") and (args.texts or args.direction):
        raise UserError(f"imagine: the model of '{args.run_dir}' has no text tower; use --unit K")
    if args.texts:
        targets.append(text_targets(model, tokenizer, args.texts))
        labels += args.texts
    for a, b in args.direction or []:
        emb = text_targets(model, tokenizer, [a, b])
        targets.append((emb[0] - emb[1]).unsqueeze(0))
        labels.append(f"{a} minus {b}")
    dim = targets[0].shape[1] if targets else int(model.encode_image(
        torch.zeros(1, 3, model.image_size, model.image_size)).shape[1])
    for k in args.unit or []:
        if not 0 <= k < dim:
            raise UserError(f"imagine: --unit {k} is outside the {dim}-dimensional embedding")
        targets.append(torch.nn.functional.one_hot(torch.tensor([k]), dim).float())
        labels.append(f"unit {k}")
    images, cosine = imagine(model, torch.cat(targets), steps=args.steps, lr=args.lr, copies=args.copies,
                             seed=args.seed, fourier=not args.pixels, progress=not args.quiet)
    paths = save_pictures(images, labels, args.out, title=f"imagined by {args.run_dir}")
    for label, c in zip(labels, cosine):
        print(f"  cos {float(c):.3f}  {label}")
    print(f"wrote {len(paths) - 1} pictures and {paths[-1]}")
    return 0


def _cmd_caption(args: argparse.Namespace) -> int:
    """Captions of image files by a run with a captioning decoder (BLIP)."""
    import numpy as np
    import torch
    from PIL import Image

    import counterpoint
    from counterpoint.data.readers import IMAGE_ERRORS, to_square_array
    from counterpoint.train.loop import load_run_model

    if args.beams is not None and args.top_p is not None:
        raise UserError("caption: give --beams or --top-p, not both")
    if args.beams is not None and args.beams < 1 or args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError("caption: --beams must be >= 1 and --top-p in (0, 1]")
    model, tokenizer, _ = load_run_model(args.run_dir)
    if not hasattr(model, "caption_logits"):
        raise UserError(f"caption: the model of '{args.run_dir}' has no captioning decoder (objective.name=blip "
                        f"trains one)")
    arrays = []
    for path in args.images:
        try:
            with Image.open(path) as img:
                arrays.append(to_square_array(img.convert("RGB"), model.image_size))
        except (*IMAGE_ERRORS, FileNotFoundError) as exc:
            raise UserError(f"caption: cannot read image '{path}' ({exc.__class__.__name__})") from None
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    captions = counterpoint.caption(model, tokenizer, images, beams=args.beams, top_p=args.top_p,
                                    max_tokens=args.max_tokens, seed=args.seed)
    for path, text in zip(args.images, captions):
        print(f"{path}: {text}")
    return 0


def _cmd_config_show(args: argparse.Namespace) -> int:
    """Every setting of the resolved config: value, default (when it differs) and what it means."""
    from counterpoint.capfilt.config import CapFiltConfig
    from counterpoint.config import describe, load_config, load_yaml
    from counterpoint.train.balance_config import load_balance_config

    keys = set(load_yaml(args.config))
    if {"method", "compare"} & keys:
        cfg, kind = load_balance_config(args.config, args.overrides), "balance (counterpoint balance ...)"
    elif {"recipe", "noisy"} & keys:
        cfg, kind = load_config(args.config, args.overrides, cls=CapFiltConfig), "CapFilt (counterpoint capfilt)"
    else:
        cfg, kind = load_config(args.config, args.overrides), "train (counterpoint train)"
    print(f"# {args.config}: a {kind} recipe, resolved; * marks a value that differs from the default")
    for key, value, default, text in describe(cfg):
        shown = json.dumps(value)
        mark = f"* (default {json.dumps(default)})" if value != default else ""
        print(f"{key:<34} {shown:<22} {mark + '  ' if mark else ''}{text}")
    return 0


def _cmd_balance(args: argparse.Namespace) -> int:
    import json

    from counterpoint.train.balance_config import load_balance_config

    cfg = load_balance_config(args.config, args.overrides)
    if args.balance_command == "train":
        from counterpoint.train.balance_loop import train_balance

        run_dir = train_balance(cfg, overwrite=args.overwrite)
        result = json.loads((run_dir / "eval.json").read_text())
        accs = ", ".join(f"{k} {v:.3f}" for k, v in result["test"]["acc"].items())
        print(f"{run_dir}: test accuracy {accs} (epoch {result['selected_epoch']}, selected on val)")
        print(f"report: {run_dir / 'report.md'}")
        return 0
    from counterpoint.train.balance_compare import compare

    command = " ".join(["counterpoint balance compare", args.config, *args.overrides])
    out = compare(cfg, overwrite=args.overwrite, command=command)
    print((out / "compare.md").read_text())
    return 0


def _cmd_capfilt(args: argparse.Namespace) -> int:
    from counterpoint.capfilt.config import CapFiltConfig
    from counterpoint.capfilt.pipeline import run_capfilt
    from counterpoint.config import load_config

    cfg = load_config(args.config, args.overrides, cls=CapFiltConfig)
    command = " ".join(["counterpoint capfilt", args.config, *args.overrides])
    out = run_capfilt(cfg, overwrite=args.overwrite, command=command)
    print((out / "capfilt.md").read_text())
    print(f"summary: {out / 'capfilt.json'}")
    return 0


def _print_summary(run_dir: Path) -> None:
    import json

    result = json.loads((run_dir / "eval.json").read_text())
    parts = []
    zs = result.get("zeroshot", {})
    for subset in ("heldout", "seen"):
        if subset in zs:
            parts.append(f"zero-shot {subset} top-1 {zs[subset]['top1']:.3f}")
    ret = result.get("retrieval")
    if ret:
        parts.append(f"t2i R@1 {ret['text_to_image']['R@1']:.3f}, i2t R@1 {ret['image_to_text']['R@1']:.3f} "
                     f"(n={ret['n']})")
    if "retrieval_itm" in result:
        parts.append(f"t2i R@1 re-ranked by ITM {result['retrieval_itm']['text_to_image']['R@1']:.3f}")
    if "linear_probe" in result:
        parts.append(f"linear probe {result['linear_probe']['top1']:.3f}")
    if "attentive_probe" in result:
        parts.append(f"attentive probe {result['attentive_probe']['top1']:.3f}")
    skipped = sum(s["total"] for s in result["data"]["skipped"].values())
    met = sum(s.get("occurrences", s["total"]) for s in result["data"]["skipped"].values())
    parts.append(f"{skipped} samples skipped" + (f" (met {met} times)" if met > skipped else ""))
    print(f"{run_dir}: " + "; ".join(parts))
    print(f"report: {run_dir / 'report.md'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="counterpoint", description="Multimodal representation learning.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"counterpoint {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="generate or convert data")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    make_sub = data_sub.add_parser("make", help="generate built-in data").add_subparsers(dest="what", required=True)
    make = make_sub.add_parser("world", help="the built-in world as image-text (and audio) files")
    make.add_argument("--out", required=True, help="output folder")
    make.add_argument("--format", choices=["wds", "csv", "folder"], default="wds",
                      help="WebDataset shards, CSV + image files, or a folder of images and captions")
    make.add_argument("--train", type=int, default=100_000, help="training pairs")
    make.add_argument("--test", type=int, default=2_000, help="retrieval test pairs")
    make.add_argument("--zeroshot", type=int, default=2_048, help="labelled single-object images")
    make.add_argument("--stories", type=int, default=0, help="interleaved documents")
    make.add_argument("--audio", action="store_true", help="also write an audio clip per sample")
    make.add_argument("--captions", choices=["literal", "weak"], default="literal",
                      help="literal: the caption describes the scene; weak: only partly related (BriVL)")
    make.add_argument("--mismatch", type=float, default=0.0, help="fraction of mismatched (noisy) pairs")
    make.add_argument("--position-prob", type=float, default=0.5,
                      help="probability that a literal caption names where objects are")
    make.add_argument("--audio-snr-db", type=float, default=20.0, help="audio noise knob (lower is harder)")
    make.add_argument("--heldout", type=int, default=8, help="colour-shape combinations kept out of training")
    make.add_argument("--image-size", type=int, default=32, help="pixels per side")
    make.add_argument("--image-format", choices=["png", "jpg", "webp"], default="png", help="image file format")
    make.add_argument("--seed", type=int, default=0, help="the whole world follows from it")
    make.add_argument("--workers", type=int, default=None,
                      help="processes writing WebDataset shards at once (default: the CPU count); the files are "
                           "the same for any number")
    make.add_argument("--quiet", action="store_true", help="no progress bars")
    make.add_argument("--overwrite", action="store_true", help="replace a world already in --out")
    make.set_defaults(func=_cmd_data_make)

    short = make_sub.add_parser("shortcut", help="coloured-and-grey shapes: colour predicts the class at train only")
    short.add_argument("--out", required=True, help="output file (.safetensors + .json)")
    short.add_argument("--train", type=int, default=6000, help="training samples")
    short.add_argument("--val", type=int, default=1000, help="validation samples")
    short.add_argument("--test", type=int, default=2000, help="test samples")
    short.add_argument("--num-classes", type=int, default=8, help="number of shape classes (2-8)")
    short.add_argument("--shortcut", type=float, default=1.0,
                       help="fraction of training samples coloured in their class colour")
    short.add_argument("--noise", type=float, default=0.0, help="pixel noise std on both modalities (0-255)")
    short.add_argument("--image-size", type=int, default=32, help="pixels per side")
    short.add_argument("--seed", type=int, default=0, help="the samples follow from it")
    short.set_defaults(func=_cmd_data_shortcut)

    av = data_sub.add_parser("av-features", help="precompute fbank + frames of an audio-visual dataset "
                             "(split CSVs, audio/<clip>.wav, visual/<clip>/*.jpg) into one file")
    av.add_argument("root", help="folder holding the split CSVs, the audio folder and the frame folders")
    av.add_argument("--out", required=True, help="output file (.safetensors + .json)")
    av.add_argument("--split-file", default="{split}.csv", help="split CSV name under ROOT")
    av.add_argument("--audio-dir", default="audio", help="folder of WAVs under ROOT")
    av.add_argument("--audio-file", default="{clip}.wav", help="WAV name inside --audio-dir")
    av.add_argument("--visual-dir", default="visual", help="holds one folder of frames per clip")
    av.add_argument("--sample-rate", type=int, default=16000, help="expected WAV sample rate (Hz)")
    av.add_argument("--resample", action="store_true", help="resample WAVs at another rate (default: skip them)")
    av.add_argument("--num-mel-bins", type=int, default=128, help="log-mel filterbank bins")
    av.add_argument("--audio-frames", type=int, default=300, help="fbank frames per clip (10 ms each)")
    av.add_argument("--frames", type=int, default=3, help="video frames per clip")
    av.add_argument("--image-size", type=int, default=112, help="frame pixels per side")
    av.add_argument("--val-fraction", type=float, default=0.1, help="of train, used when there is no val CSV")
    av.add_argument("--seed", type=int, default=0, help="seed of the train/val split when there is no val CSV")
    av.add_argument("--quiet", action="store_true", help="no progress bars")
    av.set_defaults(func=_cmd_data_av_features)

    docs = data_sub.add_parser("documents", help="write interleaved documents (OBELICS, MMC4, the world's stories, "
                               "pairs) as WebDataset shards, one document per sample, for streaming")
    docs.add_argument("source", help="documents: a .jsonl / .jsonl.zip / .parquet file or a folder of them, or "
                      "pair data")
    docs.add_argument("--out", required=True, help="output folder (new or empty)")
    docs.add_argument("--docs-per-shard", type=int, default=1000, help="documents per tar shard")
    docs.add_argument("--image-format", choices=("png", "jpg", "webp"), default="png", help="how images are stored")
    docs.add_argument("--seed", type=int, default=0, help="MMC4 image placement and pair order follow from it")
    docs.add_argument("--quiet", action="store_true", help="no progress bar")
    docs.set_defaults(func=_cmd_data_documents)

    tr = sub.add_parser("train", help="pretrain, evaluate and report")
    tr.add_argument("config", help="YAML recipe, e.g. configs/clip_world.yaml")
    tr.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=3e-4")
    group = tr.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    group.add_argument("--overwrite", action="store_true", help="discard an existing run in out_dir")
    tr.set_defaults(func=_cmd_train)

    ev = sub.add_parser("eval", help="re-evaluate a saved run")
    ev.add_argument("run_dir", help="the out_dir of a training run")
    ev.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.test=mydata/test.csv")
    ev.add_argument("--out", help="folder for eval.json and report.md (default: the run directory without "
                    "overrides, RUN_DIR/evals/<overrides> with them, so the training-time results stay)")
    ev.set_defaults(func=_cmd_eval)

    im = sub.add_parser("imagine", help="pictures of what texts mean to a trained model (BriVL's imagination)")
    im.add_argument("run_dir", help="the out_dir of a training run")
    im.add_argument("texts", nargs="*", help="texts to imagine, e.g. \"a red star\"")
    im.add_argument("--out", required=True, help="folder for one PNG per picture and grid.png")
    im.add_argument("--direction", nargs=2, action="append", metavar=("A", "B"),
                    help="imagine the direction text A minus text B (repeatable)")
    im.add_argument("--unit", type=int, action="append", help="imagine one embedding unit (repeatable)")
    im.add_argument("--steps", type=int, default=500, help="optimisation steps")
    im.add_argument("--lr", type=float, default=0.05, help="Adam learning rate")
    im.add_argument("--copies", type=int, default=4, help="randomly transformed copies scored per step")
    im.add_argument("--seed", type=int, default=0, help="the pictures follow from it")
    im.add_argument("--pixels", action="store_true", help="plain pixel parameterisation (the ablation)")
    im.add_argument("--quiet", action="store_true", help="no progress bar")
    im.set_defaults(func=_cmd_imagine)

    cap = sub.add_parser("caption", help="caption images with a trained captioning decoder (BLIP)")
    cap.add_argument("run_dir", help="a run trained with objective.name=blip")
    cap.add_argument("images", nargs="+", help="image files")
    cap.add_argument("--beams", type=int, default=None, help="beam search with this many beams")
    cap.add_argument("--top-p", type=float, default=None, help="nucleus sampling with this probability mass")
    cap.add_argument("--max-tokens", type=int, default=30, help="at most this many generated tokens")
    cap.add_argument("--seed", type=int, default=0, help="nucleus sampling follows from it")
    cap.set_defaults(func=_cmd_caption)

    conf = sub.add_parser("config", help="inspect recipes")
    conf_sub = conf.add_subparsers(dest="config_command", required=True)
    show = conf_sub.add_parser("show", help="every setting of a recipe (+ overrides): value, default, meaning")
    show.add_argument("config", help="YAML recipe, e.g. configs/clip_world.yaml")
    show.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=3e-4")
    show.set_defaults(func=_cmd_config_show)

    launch = sub.add_parser("launch", help="run a command in several processes (torchrun), errors printed once",
                            description="counterpoint launch [torchrun options] -- COMMAND ...; e.g. counterpoint "
                            "launch --nproc-per-node 2 -- train configs/clip_world.yaml")
    launch.add_argument("args", nargs=argparse.REMAINDER, metavar="...",
                        help="torchrun options (e.g. --nproc-per-node 2 --max-restarts 3), then --, then the "
                        "counterpoint command and its arguments")
    launch.set_defaults(func=_cmd_launch)

    bal = sub.add_parser("balance", help="balanced multimodal classification (MMPareto and baselines)")
    bal_sub = bal.add_subparsers(dest="balance_command", required=True)
    for name, text in (("train", "train one method on one seed"),
                       ("compare", "run compare.methods x compare.seeds and write a table")):
        cmd = bal_sub.add_parser(name, help=text)
        cmd.add_argument("config", help="YAML recipe, e.g. configs/balance_av.yaml")
        cmd.add_argument("overrides", nargs="*", help="key=value overrides, e.g. method.name=uniform")
        cmd.add_argument("--overwrite", action="store_true", help="replace existing runs in out_dir")
        cmd.set_defaults(func=_cmd_balance)

    capfilt = sub.add_parser("capfilt", help="BLIP's CapFilt: pretrain on noisy pairs, fine-tune a captioner and a "
                             "filter, bootstrap the data, pretrain again; a report of every stage")
    capfilt.add_argument("config", help="CapFilt recipe, e.g. configs/capfilt_world.yaml")
    capfilt.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seeds=[0,1,2] bootstrap.threshold=0.6")
    capfilt.add_argument("--overwrite", action="store_true", help="redo every stage instead of reusing finished ones")
    capfilt.set_defaults(func=_cmd_capfilt)
    _show_defaults(parser)
    return parser


def _cmd_launch(args: argparse.Namespace) -> int:
    """torchrun with counterpoint as the program: a user error is printed once (not once per rank) and ends the
    job with exit code 2, without the launcher's own traceback."""
    import tempfile

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if "--" not in args.args:
        raise UserError("launch: separate torchrun's options from the command with --, e.g. counterpoint launch "
                        "--nproc-per-node 2 -- train configs/clip_world.yaml")
    cut = args.args.index("--")
    torchrun, command = args.args[:cut], args.args[cut + 1 :]
    if not command:
        raise UserError("launch: name the command to run, e.g. counterpoint launch --nproc-per-node 2 -- train "
                        "configs/clip_world.yaml")
    torchrun_args = get_args_parser().parse_args([*torchrun, "-m", "counterpoint.cli", *command])
    with tempfile.TemporaryDirectory(prefix="counterpoint-errors-") as errors:
        os.environ[ERROR_DIR_ENV] = errors
        try:
            run(torchrun_args)
        except ChildFailedError as exc:
            messages = sorted({p.read_text() for p in Path(errors).glob("rank-*.txt")})
            if messages:
                print("\n".join(messages), file=sys.stderr)
                return 2
            codes = [f.exitcode for f in exc.failures.values()]
            print(f"counterpoint: error: a process of the job failed (exit code {codes[0]}); its output is above",
                  file=sys.stderr)
            return 1
        finally:
            del os.environ[ERROR_DIR_ENV]
    return 0


# Set by `counterpoint launch`: each rank writes its one-line user error here, and the launcher prints each
# distinct message once.
ERROR_DIR_ENV = "COUNTERPOINT_ERROR_DIR"


def _report_user_error(message: str) -> None:
    """Print a user error once per job: rank 0 prints (under torchrun every rank usually fails alike); under
    ``counterpoint launch`` every rank hands its message to the launcher instead."""
    line = f"counterpoint: error: {message}"
    rank = os.environ.get("RANK", "0")
    if os.environ.get(ERROR_DIR_ENV) and os.environ.get("WORLD_SIZE", "1") != "1":
        (Path(os.environ[ERROR_DIR_ENV]) / f"rank-{rank}.txt").write_text(line)
    elif rank == "0":
        print(line, file=sys.stderr)


class _DefaultsHelp(argparse.HelpFormatter):
    """Shows every option's default, also of options without a help text (argparse's own formatter skips
    those); flags that are off by default say nothing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        off = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if action.option_strings and not off and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every subcommand's --help shows each option's default."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                child.formatter_class = _DefaultsHelp
                _show_defaults(child)


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; ``key=value`` overrides may come before or after flags (``train cfg.yaml --overwrite
    train.lr=1e-3``), which argparse alone refuses once a flag has ended the positional list."""
    if argv[:1] == ["launch"] and not set(argv[1:2]) & {"-h", "--help"}:
        return argparse.Namespace(args=argv[1:], func=_cmd_launch)  # torchrun's options are not ours to parse
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    if extra != overrides or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(a for a in extra if a not in overrides) or extra[0]}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # a bare `counterpoint`: what can it do?
        parser.print_help()
        return 0
    args = _parse(parser, argv)
    try:
        return args.func(args)
    except UserError as exc:
        _report_user_error(str(exc))
        return 2
    except BrokenPipeError:  # output piped into `head` and the like: the reader has what it wanted
        sys.stdout = open(os.devnull, "w")  # Python flushes stdout once more at exit
        return 0
    except KeyboardInterrupt as exc:
        print(f"counterpoint: {exc or 'interrupted'}", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno is None or exc.errno not in _ENVIRONMENT_ERRNOS:
            raise
        # The machine, not the user's input: a full disk, a read-only or vanished mount, a permission.
        where = f" '{exc.filename}'" if exc.filename else ""
        print(f"counterpoint: error: {exc.strerror or exc}{where}; what was written before is kept "
              f"(a training run continues with --resume)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
