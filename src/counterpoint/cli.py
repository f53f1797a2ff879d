"""The ``counterpoint`` command.

    counterpoint data make world --out data/world [--format wds|csv|folder] [--train N] ...
    counterpoint train configs/clip_world.yaml [key=value ...] [--resume | --overwrite]
    counterpoint eval RUN_DIR [key=value ...]

Both ``train`` and ``eval`` run unchanged under ``torchrun --nproc-per-node N`` (see ``train/distributed.py``).
A user mistake prints one line, ``counterpoint: error: ...``, and exits with code 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from counterpoint.errors import UserError


def _cmd_data_make(args: argparse.Namespace) -> int:
    from counterpoint.data.make_world import make_world
    from counterpoint.data.world import WorldConfig

    try:
        wcfg = WorldConfig(seed=args.seed, image_size=args.image_size, caption_mode=args.captions,
                           mismatch_fraction=args.mismatch, num_heldout=args.heldout,
                           position_prob=args.position_prob, audio_snr_db=args.audio_snr_db)
    except ValueError as exc:
        raise UserError(f"data make world: {exc}") from None
    info = make_world(args.out, wcfg, args.format, args.train, args.test, args.zeroshot, args.stories,
                      args.audio, args.image_format, progress=not args.quiet)
    print(f"wrote the built-in world to {args.out} ({args.format}): "
          + ", ".join(f"{k} {v}" for k, v in info["splits"].items() if v)
          + f"; {len(info['classes'])} classes, {len(info['heldout'])} held out of training")
    return 0


def _is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a plain process: the one that prints."""
    import os

    return int(os.environ.get("RANK", "0")) == 0


def _cmd_train(args: argparse.Namespace) -> int:
    from counterpoint.config import load_config
    from counterpoint.train.loop import train

    cfg = load_config(args.config, args.overrides)
    run_dir = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if _is_main_process():
        _print_summary(run_dir)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from counterpoint.config import load_config
    from counterpoint.train.distributed import distributed_session
    from counterpoint.train.loop import finalize_run, load_run_model

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"'{run_dir}' is not a run directory (no config.yaml); pass the out_dir of a training run")
    cfg = load_config(run_dir / "config.yaml", args.overrides)
    with distributed_session(cfg.train.device) as ctx:  # under torchrun the ranks share the evaluation
        model, tokenizer, meta = load_run_model(run_dir, ctx.device)
        finalize_run(run_dir, model, tokenizer, cfg, ctx.device, meta["step"])
    if _is_main_process():
        _print_summary(run_dir)
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
    if "linear_probe" in result:
        parts.append(f"linear probe {result['linear_probe']['top1']:.3f}")
    skipped = sum(s["total"] for s in result["data"]["skipped"].values())
    parts.append(f"{skipped} samples skipped")
    print(f"{run_dir}: " + "; ".join(parts))
    print(f"report: {run_dir / 'report.md'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="counterpoint", description="Multimodal representation learning.")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="generate or convert data")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    make = data_sub.add_parser("make", help="write the built-in world to disk")
    make.add_argument("what", choices=["world"])
    make.add_argument("--out", required=True, help="output folder")
    make.add_argument("--format", choices=["wds", "csv", "folder"], default="wds")
    make.add_argument("--train", type=int, default=100_000, help="training pairs")
    make.add_argument("--test", type=int, default=2_000, help="retrieval test pairs")
    make.add_argument("--zeroshot", type=int, default=2_048, help="labelled single-object images")
    make.add_argument("--stories", type=int, default=0, help="interleaved documents")
    make.add_argument("--audio", action="store_true", help="also write an audio clip per sample")
    make.add_argument("--captions", choices=["literal", "weak"], default="literal")
    make.add_argument("--mismatch", type=float, default=0.0, help="fraction of mismatched (noisy) pairs")
    make.add_argument("--position-prob", type=float, default=0.5,
                      help="probability that a literal caption names where objects are")
    make.add_argument("--audio-snr-db", type=float, default=20.0, help="audio noise knob (lower is harder)")
    make.add_argument("--heldout", type=int, default=8, help="colour-shape combinations kept out of training")
    make.add_argument("--image-size", type=int, default=32)
    make.add_argument("--image-format", choices=["png", "jpg", "webp"], default="png")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--quiet", action="store_true")
    make.set_defaults(func=_cmd_data_make)

    tr = sub.add_parser("train", help="pretrain, evaluate and report")
    tr.add_argument("config", help="YAML recipe, e.g. configs/clip_world.yaml")
    tr.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=3e-4")
    group = tr.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    group.add_argument("--overwrite", action="store_true", help="discard an existing run in out_dir")
    tr.set_defaults(func=_cmd_train)

    ev = sub.add_parser("eval", help="re-evaluate a saved run")
    ev.add_argument("run_dir")
    ev.add_argument("overrides", nargs="*", help="key=value overrides, e.g. eval.linear_probe=false")
    ev.set_defaults(func=_cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"counterpoint: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("counterpoint: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
