"""CapFilt (``counterpoint capfilt``): the chain of runs on a small noisy world, the cleaned shards, the filter
scored against the world's truth, reuse of finished stages, and the recipe's one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from counterpoint.capfilt import pipeline
from counterpoint.capfilt.bootstrap import SYNTHETIC_SUFFIX, THRESHOLDS, removal_curve, removal_scores
from counterpoint.capfilt.config import CapFiltConfig
from counterpoint.cli import main
from counterpoint.config import from_dict, load_config, to_dict
from counterpoint.data.make_world import make_world
from counterpoint.data.readers import SkipStats, iter_tar_groups, tar_files
from counterpoint.data.world import World, WorldConfig
from tests.conftest import one_line_error

NOISY = WorldConfig(seed=2, mismatch_fraction=0.3)
RECIPE = """
model: {name: tiny-vit, embed_dim: 32, context_length: 40}
data: {train: unused}
objective: {name: blip, queue_size: 64}
train: {epochs: 1, batch_size: 32, lr: 2.0e-3, warmup_steps: 2, log_every: 1, checkpoint_every: 1000, threads: 1}
eval: {linear_probe: false, captions: 8, rerank_k: 4, imagine: 0, batch_size: 128}
"""


def test_removal_scores_by_hand() -> None:
    # 5 originals, 2 mismatched (indices 1, 3); the filter drops 1, 2 and 4: one hit of three removals
    matched = [True, False, True, False, True]
    kept = [True, False, False, True, False]
    scores = removal_scores(matched, kept)
    assert scores["removed"] == 3 and scores["mismatched"] == 2 and scores["removed_mismatched"] == 1
    assert scores["precision"] == pytest.approx(1 / 3) and scores["recall"] == pytest.approx(1 / 2)
    assert scores["noise_before"] == pytest.approx(2 / 5) and scores["noise_after"] == pytest.approx(1 / 2)


def test_removal_curve_is_removal_scores_at_every_threshold() -> None:
    rng = np.random.default_rng(0)
    p = rng.random(200)
    matched = list(rng.random(200) > 0.3)
    curve = removal_curve([float(x) for x, m in zip(p, matched) if m], [float(x) for x, m in zip(p, matched) if not m])
    assert [c["threshold"] for c in curve] == list(THRESHOLDS)
    for point in curve:
        kept = [bool(x >= point["threshold"]) for x in p]
        direct = removal_scores(matched, kept)
        assert point["precision"] == pytest.approx(direct["precision"]) and point["kept"] == sum(kept)
        assert point["recall"] == pytest.approx(direct["recall"])


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> tuple[CapFiltConfig, Path]:
    root = tmp_path_factory.mktemp("capfilt")
    make_world(root / "noisy", NOISY, "wds", train=192, test=0, zeroshot=64, progress=False, workers=1)
    make_world(root / "clean", WorldConfig(seed=3), "wds", train=64, test=48, zeroshot=0, progress=False, workers=1)
    (root / "blip.yaml").write_text(RECIPE)
    cfg = from_dict(CapFiltConfig, {
        "out_dir": str(root / "out"), "recipe": str(root / "blip.yaml"), "noisy": str(root / "noisy" / "train"),
        "clean": str(root / "clean" / "train"), "test": str(root / "clean" / "test"), "seeds": [0],
        "progress": False, "bootstrap": {"batch_size": 64, "examples": 4, "max_tokens": 12, "threshold": 0.0}})
    return cfg, pipeline.run_capfilt(cfg, command="counterpoint capfilt test")


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_the_chain_runs_every_stage_and_writes_the_cleaned_shards(chain: tuple[CapFiltConfig, Path]) -> None:
    cfg, out = chain
    seed_dir = out / "seed0"
    for stage in ("noisy", "captioner", "filter", "capfilt"):
        assert (seed_dir / stage / "eval.json").is_file(), stage
    captioner = load_config(seed_dir / "captioner" / "config.yaml")
    assert captioner.train.init_from == str(seed_dir / "noisy") and captioner.data.train == cfg.clean
    assert captioner.objective.itc_weight == 0 and captioner.objective.lm_weight == 1
    assert load_config(seed_dir / "filter" / "config.yaml").objective.lm_weight == 0
    capfilt_run = load_config(seed_dir / "capfilt" / "config.yaml")
    assert capfilt_run.train.init_from is None and capfilt_run.data.train == str(seed_dir / "bootstrap" / "shards")
    # the bootstrapped data is evaluated on the noisy world's own zero-shot set
    assert capfilt_run.data.zeroshot == str(Path(cfg.noisy).parent / "zeroshot")

    boot = json.loads((seed_dir / "bootstrap" / "bootstrap.json").read_text())
    counts = boot["counts"]
    assert counts["images"] == 192
    assert boot["pairs_written"] == counts["original_kept"] + counts["synthetic_kept"]
    written = {}
    for tar in tar_files(str(seed_dir / "bootstrap" / "shards")):
        for key, members in iter_tar_groups(tar, SkipStats()):
            written[key] = members
    assert len(written) == boot["pairs_written"]
    originals = {key: members for tar in tar_files(cfg.noisy) for key, members in iter_tar_groups(tar, SkipStats())}
    for key, members in written.items():
        source = key.removesuffix(SYNTHETIC_SUFFIX)
        meta = json.loads(members["json"])
        assert meta["capfilt"]["source"] == ("synthetic" if key.endswith(SYNTHETIC_SUFFIX) else "original")
        assert meta["capfilt"]["p_match"] >= cfg.bootstrap.threshold
        assert members["png"] == originals[source]["png"]  # the image's own bytes
        if meta["capfilt"]["source"] == "original":
            assert members["txt"] == originals[source]["txt"]

    # threshold 0 keeps everything: nothing removed, every non-empty synthetic caption added
    assert counts["original_kept"] == 192 and counts["synthetic_kept"] == 192 - counts["synthetic_empty"]
    truth = [World(NOISY).pair("train", i).matched for i in range(192)]
    scores = boot["filter_vs_truth"]
    assert scores["mismatched"] == truth.count(False) > 0 and scores["removed"] == 0 and scores["recall"] == 0
    assert scores["noise_after"] == pytest.approx(truth.count(False) / 192)
    assert boot["synthetic_attributes"]["all"]["n"] == 192
    quantiles = boot["p_match"]["original"]
    assert 0 <= quantiles["q10"] <= quantiles["q50"] <= quantiles["q90"] <= 1

    summary = json.loads((out / "capfilt.json").read_text())
    for model in ("noisy", "capfilt"):
        assert 0 <= summary["table"][model]["t2i_R@1"]["mean"] <= 1
    assert summary["table"]["filter_precision"]["values"] == [scores["precision"]]
    report = (out / "capfilt.md").read_text()
    assert "text-to-image R@1" in report and "removal precision" in report
    for picture in ("filter.png", "examples/original/grid.png", "examples/synthetic/grid.png"):
        assert (seed_dir / "bootstrap" / picture).is_file()


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_finished_stages_are_reused_and_a_changed_bootstrap_redoes_only_what_follows(
        chain: tuple[CapFiltConfig, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, out = chain
    trained: list[str] = []
    real_train = pipeline.train

    def spy(run_cfg: object, **kwargs: object) -> Path:
        trained.append(Path(run_cfg.out_dir).name)
        return real_train(run_cfg, **kwargs)

    monkeypatch.setattr(pipeline, "train", spy)
    pipeline.run_capfilt(cfg)
    assert trained == []  # everything reused
    watched = from_dict(CapFiltConfig, {**to_dict(cfg), "captioner": [*cfg.captioner, "train.log_every=7"]})
    pipeline.run_capfilt(watched)
    assert trained == []  # logging more often changes nothing that was computed
    saved = out / "seed0" / "noisy" / "config.yaml"
    older = yaml.safe_load(saved.read_text())
    del older["train"]["loggers"]  # a run written before that setting existed: it had the default
    saved.write_text(yaml.safe_dump(older))
    pipeline.run_capfilt(cfg)
    assert trained == []
    # the median p(match) of the originals as the threshold: about half of them go
    median = json.loads((out / "seed0" / "bootstrap" / "bootstrap.json").read_text())["p_match"]["original"]["q50"]
    stricter = from_dict(CapFiltConfig, {**to_dict(cfg), "bootstrap": {**vars(cfg.bootstrap), "threshold": median}})
    pipeline.run_capfilt(stricter)
    assert trained == ["capfilt"]  # the pretrained model, captioner and filter stand; the data changed
    boot = json.loads((out / "seed0" / "bootstrap" / "bootstrap.json").read_text())
    assert boot["settings"]["threshold"] == median
    scores = boot["filter_vs_truth"]
    assert 80 <= scores["removed"] <= 112 and scores["removed"] == 192 - boot["counts"]["original_kept"]
    assert 0 <= scores["precision"] <= 1 and 0 < scores["recall"] <= 1


def test_recipe_mistakes_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = tmp_path / "capfilt.yaml"
    recipe.write_text("recipe: configs/clip_world.yaml\nthreshold: 0.5\n")
    assert main(["capfilt", str(recipe)]) == 2
    one_line_error(capsys.readouterr().err, "threshold")  # belongs under bootstrap:
    recipe.write_text("recipe: configs/clip_world.yaml\nbootstrap: {top_p: 1.5}\n")
    assert main(["capfilt", str(recipe)]) == 2
    one_line_error(capsys.readouterr().err, "bootstrap.top_p")
    recipe.write_text(f"recipe: {Path(__file__).parents[1] / 'configs' / 'clip_world.yaml'}\n"
                      f"out_dir: {tmp_path / 'out'}\n")
    assert main(["capfilt", str(recipe)]) == 2
    one_line_error(capsys.readouterr().err, "objective.name=clip", "BLIP recipe")
