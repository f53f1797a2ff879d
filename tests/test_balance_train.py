"""Balance training end to end on tiny real data: the AV benchmark generator, a 3-modality dataset file,
every fusion type, the run directory contract, selection on val (test evaluated once, for the selected
checkpoint), the comparison command in a real process, and config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from counterpoint.cli import main
from counterpoint.config import ConfigError
from counterpoint.data.av_world import AVWorldConfig, make_av_world
from counterpoint.data.multimodal import ModalDataset, ModalSplit
from counterpoint.data.world import SHAPES
from counterpoint.evaluate import modality as modality_eval
from counterpoint.models.fusion import FUSIONS
from counterpoint.train import balance_loop
from counterpoint.train.balance_config import load_balance_config
from counterpoint.train.balance_loop import build_run_model, selection_score, train_balance
from counterpoint.train.checkpoint import load_model_weights
from tests.dist_utils import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
TINY_AV = ["data.av_world.train=96", "data.av_world.val=48", "data.av_world.test=48"]
TINY_MODEL = ["model.dim=8", "model.encoders.audio.widths=[4]", "model.encoders.audio.depths=[1]",
              "model.encoders.visual.widths=[4]", "model.encoders.visual.depths=[1]",
              "model.encoders.text.width=8", "model.encoders.text.layers=1"]
TINY_TRAIN = ["train.epochs=2", "train.batch_size=32", "train.lr=0.05", "train.progress=false",
              "train.precise_bn_batches=2"]


def test_av_world_is_deterministic_balanced_and_knobbed() -> None:
    cfg = AVWorldConfig(train=16, val=8, test=8, frames=2)
    a, b = make_av_world(cfg), make_av_world(cfg)
    for split in ("train", "val", "test"):
        for k in ("audio", "visual"):
            assert torch.equal(a.splits[split].inputs[k], b.splits[split].inputs[k])
    train = a.splits["train"]
    assert train.inputs["visual"].shape == (16, 2, 3, 16, 16) and train.inputs["visual"].dtype == torch.uint8
    assert train.inputs["audio"].shape == (16, 28, 32)  # 0.3 s at 10 ms shift, 32 mel bins
    assert torch.equal(train.labels.bincount(), torch.full((8,), 2))
    noisy = make_av_world(AVWorldConfig(train=16, val=8, test=8, image_noise=80.0, audio_snr_db=-10.0))
    clean = make_av_world(AVWorldConfig(train=16, val=8, test=8, image_noise=0.0, audio_snr_db=30.0))
    assert noisy.splits["train"].inputs["visual"].float().std() > clean.splits["train"].inputs["visual"].float().std()
    assert make_av_world(AVWorldConfig(train=8, val=8, test=8, label="colour")).classes[0] == "red"
    assert make_av_world(AVWorldConfig(train=8, val=8, test=8, label="shape")).classes == list(SHAPES)
    with pytest.raises(ValueError, match="image_noise"):
        AVWorldConfig(image_noise=-1.0)


@pytest.fixture(scope="module")
def three_modal_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The AV benchmark plus a weak text modality (the label's token among noise tokens), saved to disk."""
    data = make_av_world(AVWorldConfig(train=96, val=48, test=48))
    gen = torch.Generator().manual_seed(0)
    splits = {}
    for name, s in data.splits.items():
        tokens = torch.randint(9, 30, (len(s), 6), generator=gen)
        tokens[:, 0] = s.labels + 1  # 0 is the pad id
        splits[name] = ModalSplit({**s.inputs, "text": tokens}, s.labels)
    return ModalDataset("three", data.classes, splits, {}).save(tmp_path_factory.mktemp("three") / "three")


@pytest.mark.slow
@pytest.mark.parametrize("fusion", FUSIONS)
def test_three_modalities_every_fusion_end_to_end(fusion: str, three_modal_file: Path, tmp_path: Path) -> None:
    cfg = load_balance_config(None, [f"out_dir={tmp_path / 'run'}", "data.benchmark=file",
                                     f"data.path={three_modal_file}", f"model.fusion={fusion}",
                                     "method.name=mmpareto", *TINY_MODEL, *TINY_TRAIN])
    run = train_balance(cfg)
    result = json.loads((run / "eval.json").read_text())
    assert result["modalities"] == ["audio", "visual", "text"]
    assert set(result["test"]["acc"]) == {"fused", "audio", "visual", "text"}
    assert sum(result["test"]["shapley"].values()) == pytest.approx(
        result["test"]["acc"]["fused"] - result["test"]["subsets"][""], abs=1e-6)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    step_rows = [r for r in rows if "loss/fused" in r]
    assert len(step_rows) == 2 * (96 // 32)
    assert all(f"cos/{k}" in r and f"alpha/{k}" in r for r in step_rows for k in ("audio", "visual", "text"))
    for name in ("config.yaml", "report.md", "cosine.png", "accuracy.png", "checkpoints/best/model.safetensors"):
        assert (run / name).is_file(), name


def test_model_selection_uses_val_and_tests_only_the_selected_checkpoint(tmp_path: Path, monkeypatch) -> None:
    data = make_av_world(AVWorldConfig(train=96, val=48, test=48))
    # Test labels are a permutation of the true ones: a test-selected epoch would look different.
    test = data.splits["test"]
    data.splits["test"] = ModalSplit(test.inputs, (test.labels + 3) % len(data.classes))
    evaluated = []
    real = modality_eval.evaluate_split

    def spy(model, split, *args, **kwargs):
        evaluated.append(split)
        return real(model, split, *args, **kwargs)

    monkeypatch.setattr(balance_loop, "evaluate_split", spy)
    cfg = load_balance_config(None, [f"out_dir={tmp_path / 'run'}", "method.name=uniform", "train.epochs=4",
                                     *TINY_MODEL[:5], *TINY_TRAIN[1:]])
    run = train_balance(cfg, data)
    result = json.loads((run / "eval.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val_acc = [r["val/acc/fused"] for r in rows if "val/acc/fused" in r]
    assert len(val_acc) == 4 and result["selected_epoch"] == 1 + val_acc.index(max(val_acc))
    assert result["val"]["acc"]["fused"] == pytest.approx(max(val_acc))
    assert sum(s is data.splits["test"] for s in evaluated) == 1  # test: once, after selection
    assert not any("test" in k for r in rows for k in r)  # and never logged during training
    model = build_run_model(cfg, data)
    load_model_weights(run / "checkpoints" / "best", model)
    again = real(model, data.splits["test"])
    assert again["acc"] == pytest.approx(result["test"]["acc"])


def test_selection_score_and_recipes_load() -> None:
    acc = {"fused": 0.9, "audio": 0.4, "visual": 0.8}
    assert selection_score(acc, "fused") == 0.9
    assert selection_score(acc, "unimodal") == pytest.approx(0.6)
    for recipe in ("configs/balance_av.yaml", "configs/balance_shortcut.yaml"):
        assert len(load_balance_config(recipe).compare.methods) == 7


def test_shortcut_benchmark_runs_with_one_channel_images(tmp_path: Path) -> None:
    cfg = load_balance_config(None, [f"out_dir={tmp_path / 's'}", "data.benchmark=shortcut", "data.shortcut.train=64",
                                     "data.shortcut.val=32", "data.shortcut.test=32", "method.name=unimodal",
                                     "model.dim=8", "model.encoders.grey.widths=[4]", "model.encoders.grey.depths=[1]",
                                     "model.encoders.coloured.widths=[4]", "model.encoders.coloured.depths=[1]",
                                     *TINY_TRAIN])
    result = json.loads((train_balance(cfg) / "eval.json").read_text())
    assert result["modalities"] == ["coloured", "grey"] and result["select_on"] == "unimodal"


def test_uniform_logs_gradient_conflicts_and_joint_without_diagnostics_logs_no_cosines(tmp_path: Path) -> None:
    data = make_av_world(AVWorldConfig(train=96, val=48, test=48))
    base = [*TINY_MODEL[:5], *TINY_TRAIN, "eval.shapley=false"]
    run = train_balance(load_balance_config(None, [f"out_dir={tmp_path / 'u'}", "method.name=uniform", *base]), data)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    cos = [r["cos/visual"] for r in rows if "cos/visual" in r]
    assert len(cos) == 6 and all(-1 <= c <= 1 for c in cos)
    result = json.loads((run / "eval.json").read_text())
    assert result["conflict_rate"]["visual"] == pytest.approx(sum(c < 0 for c in cos) / len(cos))
    off = train_balance(load_balance_config(None, [f"out_dir={tmp_path / 'j'}", "method.name=joint",
                                                   "train.diagnostics=false", *base]), data)
    rows = [json.loads(line) for line in (off / "metrics.jsonl").read_text().splitlines()]
    assert not any("cos/visual" in r for r in rows)  # joint without diagnostics: one backward, no stats


def test_config_errors_are_one_line_exit_2(tmp_path: Path, capsys) -> None:
    cases = [
        (["method.gamma=1.5", "method.name=uniform"], "method.gamma is not an option of method 'uniform'"),
        (["method.name=adam"], "unknown method 'adam'"),
        (["model.fusion=product"], "model.fusion"),
        (["data.av_world.image_noise=-3"], "data.av_world.image_noise must be >= 0"),
        (["train.lerning_rate=1"], "unknown config key 'train.lerning_rate'"),
        (["model.encoders.audio.widths=[4,8,16]"], "model.encoders.audio.widths and model.encoders.audio.depths"),
        (["method.name=mmpareto", "method.rescale=sideways"], "rescale must be 'per_tensor' or 'per_encoder'"),
        (["compare.methods=[{name: joint}, {name: joint}]"], "label 'joint' is used twice"),
        (["data.benchmark=file"], "data.path must name a dataset"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_balance_config(None, overrides)
    assert main(["balance", "train", str(tmp_path / "missing.yaml")]) == 2
    assert main(["balance", "train", "configs/balance_av.yaml", "method.name=adam"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("counterpoint: error: ") for line in err)


@pytest.mark.slow
def test_compare_command_in_a_real_process(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    """The command in its own (forked) process: runs of every method and seed, the summary, reuse."""
    args = ["balance", "compare", str(ROOT / "configs/balance_av.yaml"),
            f"out_dir={out}", "compare.seeds=[0,1]",
            "compare.methods=[{name: joint}, {name: unimodal}, {name: mmpareto, gamma: 1.0, label: mmp1}]",
            *TINY_AV, *TINY_MODEL[:5], "train.epochs=1", "train.batch_size=32", "train.progress=false",
            "train.precise_bn_batches=1"]
    proc = run_cli(args, tmp_path / "logs", name="first")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "compare.json").read_text())
    assert list(summary["methods"]) == ["joint", "unimodal", "mmp1"]
    for label in summary["methods"]:
        runs = [json.loads((out / f"{label}-seed{s}" / "eval.json").read_text()) for s in (0, 1)]
        fused = [r["test"]["acc"]["fused"] for r in runs]
        stat = summary["methods"][label]["acc"]["fused"]
        assert stat["mean"] == pytest.approx(sum(fused) / 2)
        assert stat["std"] == pytest.approx(abs(fused[0] - fused[1]) / 2 ** 0.5)
    weak = summary["weak_modality"]
    gap = summary["imbalance"]["gap_points"]
    assert gap == pytest.approx(100 * (summary["methods"]["unimodal"]["acc"][weak]["mean"]
                                       - summary["methods"]["joint"]["acc"][weak]["mean"]))
    md = (out / "compare.md").read_text()
    assert "| mmp1 |" in md and "Command: `counterpoint balance compare" in md
    assert (out / "compare_accuracy.png").is_file() and (out / "compare_cosine.png").is_file()
    # Run again: the finished runs of the same config are reused (not retrained), a changed config is not.
    stamp = (out / "joint-seed0" / "eval.json").stat().st_mtime_ns
    assert run_cli(args, tmp_path / "logs", name="again").returncode == 0
    assert (out / "joint-seed0" / "eval.json").stat().st_mtime_ns == stamp
    changed = run_cli([*args, "train.lr=0.03"], tmp_path / "logs", name="changed")
    assert changed.returncode == 2 and "already holds a run" in changed.stderr
