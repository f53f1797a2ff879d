"""The CapFilt recipe (``configs/capfilt_world.yaml``): which run recipe every stage starts from, the data,
the seeds, each stage's settings and the bootstrap's."""

from __future__ import annotations

from dataclasses import dataclass, field

from counterpoint.config import ConfigError


@dataclass
class BootstrapConfig:
    """Captioning every noisy image and filtering every caption (BLIP section 3.3)."""

    top_p: float = 0.9  # nucleus sampling of the synthetic captions (BLIP: more diverse than beam search, and better)
    max_tokens: int = 30  # caption tokens at most
    threshold: float = 0.5  # keep a caption (original or synthetic) when the filter's ITM p(match) >= this
    synthetic: bool = True  # add the synthetic captions that pass the filter (false: filter the originals only)
    batch_size: int = 256  # images captioned and scored at once
    examples: int = 16  # images shown in the report with their original and synthetic captions and decisions

    def __post_init__(self) -> None:
        checks = [(0 < self.top_p <= 1, "bootstrap.top_p must be in (0, 1]"),
                  (self.max_tokens >= 1, "bootstrap.max_tokens must be >= 1"),
                  (0 <= self.threshold <= 1, "bootstrap.threshold must be in [0, 1]"),
                  (self.batch_size >= 1, "bootstrap.batch_size must be >= 1"),
                  (self.examples >= 0, "bootstrap.examples must be >= 0")]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@dataclass
class CapFiltConfig:
    """Every stage is an ordinary run of ``recipe`` (a BLIP run recipe) with the stage's overrides: pretrain on
    ``noisy``; fine-tune a captioner and a filter from it on ``clean`` (as BLIP fine-tunes them on COCO);
    bootstrap ``noisy`` with them; pretrain again, from scratch, on the result. Both pretrained models are
    evaluated on ``test``."""

    out_dir: str = "runs/capfilt-world"  # one folder per seed with a run directory per stage, and the summary
    recipe: str = "configs/blip_world.yaml"  # the run recipe every stage starts from (objective.name: blip)
    noisy: str = "data/noisy/train"  # the web-like pairs to bootstrap (WebDataset shards)
    clean: str = "data/clean/train"  # a small clean set the captioner and filter are fine-tuned on
    test: str = "data/clean/test"  # clean test pairs every model is evaluated on
    zeroshot: str = "auto"  # labelled images for zero-shot ("auto": the noisy data's own, as a run finds them)
    seeds: tuple[int, ...] = (0,)  # the whole chain once per seed
    pretrain: tuple[str, ...] = ()  # key=value settings of both pretraining runs (on noisy, then on CapFilt data)
    captioner: tuple[str, ...] = ("objective.itc_weight=0", "objective.itm_weight=0")  # its settings: captioning only
    filter: tuple[str, ...] = ("objective.lm_weight=0",)  # its settings: contrast and matching only (as BLIP's)
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    progress: bool = True  # progress bars

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ConfigError("seeds must name at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be distinct, got {list(self.seeds)}")
        for stage in ("pretrain", "captioner", "filter"):
            for item in getattr(self, stage):
                if "=" not in item:
                    raise ConfigError(f"{stage}: '{item}' is not a key=value setting")
