"""Is imagination real or adversarial noise? Pictures imagined with model A, recognised by model B.

The check the feature-visualisation literature proposes (METHODS.md, "Imagination"): imagine every class
prompt of the built-in world with model A (``counterpoint.imagine``), then classify the pictures zero-shot
with an independently trained model B (another seed and another image-tower type). Adversarial patterns that
only fool A do not transfer; pictures of a red star are a red star to B as well. Reports B's 64-class top-1
and colour top-1 (the predicted class has the prompt's colour) on A's pictures, A's own accuracy on them, and
B's accuracy on real zero-shot images for reference; writes the pictures as a labelled grid (prompt, then
what B sees).

    python experiments/imagination_check.py --a runs/clip-world --b runs/clip-world-vit \
        --classes data/world/world.json --out docs/imagination
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import counterpoint
from counterpoint.evaluate.inputs import load_classes
from counterpoint.evaluate.zeroshot import class_embeddings
from counterpoint.visualize.grid import save_pictures


def classify(model: torch.nn.Module, tokenizer: object, images: torch.Tensor, classes: list[str],
             templates: list[str]) -> torch.Tensor:
    """Zero-shot class index of each uint8 image (the mean of the class's template embeddings)."""
    with torch.no_grad():
        weights = class_embeddings(model, tokenizer, classes, templates)
        return (counterpoint.encode_image(model, images) @ weights.T).argmax(dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", type=Path, required=True, help="run that imagines")
    parser.add_argument("--b", type=Path, required=True, help="independent run that classifies")
    parser.add_argument("--classes", type=Path, required=True, help="the world's world.json")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pixels", action="store_true", help="ablation: plain pixel parameterisation")
    parser.add_argument("--reuse", action="store_true",
                        help="classify the pictures an earlier check of the same A wrote to --out (images.safetensors)")
    args = parser.parse_args()
    model_a, tok_a = counterpoint.load_checkpoint(args.a)
    model_b, tok_b = counterpoint.load_checkpoint(args.b)
    classes, templates, heldout = load_classes(args.classes)
    prompts = [templates[0].format(c=c) for c in classes]
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "images.safetensors"
    start = time.perf_counter()
    if args.reuse:
        images = load_file(saved)["images"]
    else:
        images, _ = counterpoint.imagine(model_a, tok_a, prompts, steps=args.steps, seed=args.seed,
                                         fourier=not args.pixels, progress=True)
        save_file({"images": images.contiguous()}, saved)
    seconds = time.perf_counter() - start
    with torch.no_grad():  # cosine of each picture with its prompt, under A
        cosine = (counterpoint.encode_image(model_a, images)
                  * counterpoint.encode_text(model_a, tok_a, prompts)).sum(dim=1)
    truth = torch.arange(len(classes))
    colours = [c.split()[0] for c in classes]
    colour = torch.tensor([sorted(set(colours)).index(c) for c in colours])
    held = torch.tensor([c in heldout for c in classes])
    result = {"a": str(args.a), "b": str(args.b), "steps": args.steps, "seed": args.seed,
              "parameterisation": "pixels" if args.pixels else "fourier", "imagine_seconds": round(seconds, 1),
              "mean_cosine_a": float(cosine.mean())}
    predictions = {}
    for name, (model, tok) in {"a": (model_a, tok_a), "b": (model_b, tok_b)}.items():
        pred = predictions[name] = classify(model, tok, images, classes, templates)
        result[f"{name}_class_top1"] = float((pred == truth).float().mean())
        result[f"{name}_colour_top1"] = float((colour[pred] == colour).float().mean())
        result[f"{name}_heldout_class_top1"] = float((pred == truth)[held].float().mean())
    labels = [f"{c} -> {classes[i]}" for c, i in zip(classes, predictions["b"].tolist())]
    save_pictures(images, labels, args.out, title=f"imagined by A ({args.a.name}); after the arrow: what B "
                                                  f"({args.b.name}) classifies it as")
    (args.out / "check.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
