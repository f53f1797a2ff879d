"""Every command of the README and of ``counterpoint --help``'s examples runs, at the smallest sizes (issue 9).

How:

* ``readme_commands()`` reads every fenced code block of README.md and keeps each line (or each ``&&`` piece
  of the Quick start's chains) that starts with ``counterpoint `` or ``torchrun `` (``.venv/bin/counterpoint``
  counts as ``counterpoint``), without its trailing ``# comment``; ``help_commands()`` does the same for the
  ``counterpoint ...`` lines of ``counterpoint.cli.EXAMPLES``. Set-up lines (venv, pip, pytest) are not
  commands of the program and are left out.
* ``SHRINK`` maps each such command, exactly as written (whitespace normalised), to what makes it small:
  arguments appended at the end (``key=value`` overrides, or flags that argparse takes the last of, e.g.
  ``--train 256`` after ``--train 6000``), whole-word replacements (``--stories 1000`` -> 4,
  ``--nproc-per-node 8`` -> 2, ``/data/CREMA-D`` -> a tiny fake layout) and torchrun options
  (``--standalone``: a free port). ``[...]`` in a README line marks optional arguments: they are passed.
  ``test_every_command_has_a_shrink_entry`` fails when a command is added to the README or the help without
  an entry here (or an entry outlives its command).
* The commands run for real, in the order of ``SHRINK`` (data before training, training before evaluation
  and resume), in one temporary working directory holding a copy of ``configs/``, since recipes use relative
  paths (``data/world``, ``runs/clip-world``). ``counterpoint ...`` runs in-process through
  ``counterpoint.cli.main`` and must return 0; ``torchrun ...`` and ``counterpoint launch ...`` start real
  processes (2 ranks, gloo on CPU), each with its own ``out_dir``. Every failure names the command.
* The README's "From Python" snippet runs with ``exec`` on the run the Quick start trained.

The table check is fast and not marked slow, so a quick run (``-m "not slow"``) catches a command without an
entry too; the others are slow. They share the working directory (module scope) and run in file order; the
distributed ones write the world themselves when run alone. One intra-op thread: on a busy 2-core machine,
torch's default of 2 threads makes the tiny float64 linear probe of the evaluation 20x slower.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

import counterpoint
from counterpoint.cli import EXAMPLES, main
from counterpoint.data.audio import write_wav

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


# ----------------------------------------------------------------------------------------------------------
# the commands


def _fenced_blocks(text: str) -> list[tuple[str, str]]:
    """``[(language, body), ...]`` of the fenced code blocks of a markdown text."""
    return re.findall(r"^```(\w*)[ \t]*\n(.*?)^```", text, flags=re.M | re.S)


def _command(piece: str) -> str | None:
    """The command in one shell piece (whitespace normalised), or None when it is not one of ours."""
    piece = " ".join(re.sub(r"(^|\s)#.*$", "", piece).split())
    piece = re.sub(r"^(\./)?\.venv/bin/counterpoint ", "counterpoint ", piece)
    return piece if piece.startswith(("counterpoint ", "torchrun ")) else None


def readme_commands() -> list[str]:
    found = []
    for language, body in _fenced_blocks(README.read_text(encoding="utf-8")):
        if language not in ("", "bash", "sh", "shell", "console"):
            continue
        for line in body.splitlines():
            for piece in line.split("&&"):
                cmd = _command(piece)
                if cmd and cmd not in found:
                    found.append(cmd)
    return found


def help_commands() -> list[str]:
    return [cmd for line in EXAMPLES.splitlines() if (cmd := _command(line))]


def python_snippet() -> str:
    """The README's "From Python" code block."""
    blocks = [body for language, body in _fenced_blocks(README.read_text(encoding="utf-8")) if language == "python"]
    assert len(blocks) == 1, f"expected one python block in README.md, found {len(blocks)}"
    return blocks[0]


@dataclasses.dataclass(frozen=True)
class Shrink:
    """How one command runs small, and what it must have written."""

    group: str  # which test runs it: "main", "balance" or "distributed"
    args: tuple[str, ...] = ()  # appended to the command
    replace: tuple[tuple[str, str], ...] = ()  # whole-word replacements in the command
    launcher: tuple[str, ...] = ()  # torchrun options, put before the program (torchrun / launch lines)
    writes: tuple[str, ...] = ()  # files that must exist afterwards


def _o(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# A world of 256 training pairs; two steps of batch 32 on one thread.
WORLD = _o("--train 256 --test 32 --zeroshot 64 --quiet")
TRAIN = _o("train.max_steps=2 train.batch_size=32 train.threads=1 train.progress=false eval.max_retrieval_samples=32 "
           "eval.imagine=2 eval.imagine_steps=3")
QUICK = _o("train.batch_size=32 train.threads=1 train.progress=false eval.max_retrieval_samples=32 "
           "eval.imagine=2 eval.imagine_steps=3")
NO_PROBE = _o("eval.linear_probe=false")
# Balance: a few dozen samples, one epoch; the Shapley evaluation stays on (it is cheap at this size).
BAL = _o("train.epochs=1 train.batch_size=16 train.progress=false train.precise_bn_batches=1")
AV_WORLD = _o("data.av_world.train=32 data.av_world.val=16 data.av_world.test=16")
# Several processes: one step, no evaluation (the distributed evaluation has its own tests).
DIST = _o("train.max_steps=1 train.batch_size=32 train.threads=1 train.device=cpu train.progress=false "
          "eval.zeroshot=false eval.retrieval=false eval.linear_probe=false eval.imagine=0")
# CapFilt's four runs: two steps each, the cheap evaluations
CAPFILT_STAGE = ",".join(("train.max_steps=2", "train.batch_size=32", "train.threads=1", "objective.queue_size=64",
                          "eval.captions=4", "eval.imagine=0", "eval.linear_probe=false",
                          "eval.max_retrieval_samples=32"))
CREMA_D = "CREMA-D"  # the fake audio-visual layout, in the working directory

# In the order they run.
SHRINK: dict[str, Shrink] = {
    # Quick start and "Other commands"
    "counterpoint data make world --out data/world": Shrink("main", WORLD, writes=("data/world/world.json",)),
    "counterpoint train configs/clip_world.yaml": Shrink(
        "main", TRAIN, writes=("runs/clip-world/eval.json", "runs/clip-world/report.md")),
    "counterpoint train configs/clip_world.yaml train.epochs=1 model.name=tiny-vit out_dir=runs/vit": Shrink(
        "main", TRAIN + NO_PROBE, writes=("runs/vit/eval.json",)),
    # Resume continues the Quick start's run to step 4: the same settings but train.max_steps.
    "counterpoint train configs/clip_world.yaml --resume": Shrink(
        "main", QUICK + ("train.max_steps=4",), writes=("runs/clip-world/checkpoints/step-00000004/state.json",)),
    "counterpoint eval runs/clip-world": Shrink("main", writes=("runs/clip-world/eval.json",)),
    "counterpoint data make world --out data/weak --captions weak --mismatch 0.2 --audio --stories 1000": Shrink(
        "main", _o("--train 64 --test 32 --zeroshot 32"), replace=(("1000", "4"),),
        writes=("data/weak/world.json",)),
    "counterpoint data make world --out data/weak-20k --captions weak --train 20000 --test 1000": Shrink(
        "main", WORLD, writes=("data/weak-20k/world.json",)),
    "counterpoint data make world --out data/literal-test --train 1000 --test 1000": Shrink(
        "main", WORLD, writes=("data/literal-test/world.json",)),
    "counterpoint train configs/brivl_weak.yaml": Shrink(
        "main", TRAIN + ("objective.queue_size=64",), writes=("runs/brivl-weak/eval.json",)),
    "counterpoint eval runs/clip-world data.test=data/weak/test": Shrink(
        "main", writes=("runs/clip-world/evals/data.test=data_weak_test/eval.json",)),
    "counterpoint eval runs/clip-world data.test=data/world/test --out runs/clip-world/evals/test": Shrink(
        "main", writes=("runs/clip-world/evals/test/eval.json",)),
    "counterpoint config show configs/clip_world.yaml train.lr=1e-3": Shrink("main"),
    'counterpoint imagine runs/clip-world "a red star" "a large blue circle at the top left" --out imagined': Shrink(
        "main", _o("--steps 3 --quiet"), writes=("imagined/grid.png",)),
    # LCL and BLIP: the stories world rewrites data/world with the same pairs (same seed and sizes) plus stories
    "counterpoint data make world --out data/world --stories 3000": Shrink(
        "main", WORLD + ("--overwrite",), replace=(("3000", "8"),), writes=("data/world/stories/stories.jsonl",)),
    "counterpoint train configs/lcl_stories.yaml": Shrink(
        "main", TRAIN + _o("train.batch_size=4 eval.imagine=0"), writes=("runs/lcl-stories/eval.json",)),
    "counterpoint data make world --out data/stories-world --train 256 --test 1000 --stories 3000": Shrink(
        "main", WORLD, replace=(("3000", "4"),), writes=("data/stories-world/stories/stories.jsonl",)),
    "counterpoint train configs/blip_world.yaml": Shrink(
        "main", TRAIN + _o("objective.queue_size=64 eval.captions=4 eval.imagine=0"),
        writes=("runs/blip-world/eval.json", "runs/blip-world/captions/grid.png")),
    "counterpoint caption runs/blip-world some.png other.jpg --beams 3": Shrink("main", _o("--max-tokens 4")),
    "counterpoint data make world --out data/noisy --mismatch 0.3 --train 20000 --test 1000": Shrink(
        "main", WORLD, writes=("data/noisy/world.json",)),
    "counterpoint data make world --out data/clean --train 2000 --test 1000 --zeroshot 0 --seed 1": Shrink(
        "main", _o("--train 64 --test 32 --quiet"), writes=("data/clean/world.json",)),
    "counterpoint capfilt configs/capfilt_world.yaml": Shrink(
        "main", ("seeds=[0]", "progress=false", "bootstrap.threshold=0", "bootstrap.batch_size=128",
                 "bootstrap.max_tokens=8", f"pretrain=[{CAPFILT_STAGE}]",
                 f"captioner=[{CAPFILT_STAGE},objective.itc_weight=0,objective.itm_weight=0]",
                 f"filter=[{CAPFILT_STAGE},objective.lm_weight=0]"),
        writes=("runs/capfilt-world/capfilt.md", "runs/capfilt-world/seed0/bootstrap/filter.png")),
    # Data for balanced multimodal learning, and balance runs
    "counterpoint data make shortcut --out data/shortcut [--shortcut 1.0] [--noise 0] [--train 6000] [--seed 0]":
        Shrink("balance", _o("--train 48 --val 16 --test 16"), writes=("data/shortcut.safetensors",)),
    "counterpoint data av-features /data/CREMA-D --out data/cremad --audio-dir AudioWAV --visual-dir Image-01-FPS":
        Shrink("balance", _o("--quiet"), replace=(("/data/CREMA-D", CREMA_D),), writes=("data/cremad.safetensors",)),
    "counterpoint balance train configs/balance_shortcut.yaml data.benchmark=file "
    "data.path=data/shortcut.safetensors out_dir=runs/shortcut-file": Shrink(
        "balance", BAL, writes=("runs/shortcut-file/eval.json",)),
    "counterpoint balance train configs/balance_av.yaml data.benchmark=file data.path=data/cremad.safetensors "
    "out_dir=runs/cremad": Shrink(
        "balance", _o("train.epochs=1 train.batch_size=4 train.progress=false train.precise_bn_batches=1"),
        writes=("runs/cremad/eval.json",)),
    "counterpoint balance train configs/balance_av.yaml method.name=uniform": Shrink(
        "balance", AV_WORLD + BAL, writes=("runs/balance-av/report.md",)),
    "counterpoint balance compare configs/balance_av.yaml": Shrink(
        "balance", AV_WORLD + BAL + ("compare.seeds=[0]",), writes=("runs/balance-av/compare.md",)),
    # Several processes
    "torchrun --nproc-per-node 2 -m counterpoint.cli train configs/clip_world.yaml": Shrink(
        "distributed", DIST + ("out_dir=runs/torchrun-ddp",), launcher=("--standalone",),
        writes=("runs/torchrun-ddp/report.md",)),
    "torchrun --nproc-per-node 8 --max-restarts 3 -m counterpoint.cli train configs/clip_world.yaml "
    "train.parallel=fsdp": Shrink("distributed", DIST + ("out_dir=runs/torchrun-fsdp",), replace=(("8", "2"),),
                                  launcher=("--standalone",), writes=("runs/torchrun-fsdp/report.md",)),
    "counterpoint launch --nproc-per-node 2 -- train configs/clip_world.yaml": Shrink(
        "distributed", DIST + ("out_dir=runs/launch",), launcher=("--standalone",),
        writes=("runs/launch/report.md",)),
}

DISTRIBUTED = [cmd for cmd, s in SHRINK.items() if s.group == "distributed"]


def argv_of(cmd: str) -> list[str]:
    """The command's words, shrunk: replacements, torchrun options before the program, arguments at the end."""
    shrink = SHRINK[cmd]
    words = [dict(shrink.replace).get(w, w) for w in shlex.split(cmd.replace("[", "").replace("]", ""))]
    if shrink.launcher:
        cut = words.index("-m") if words[0] == "torchrun" else words.index("--")
        words[cut:cut] = shrink.launcher
    return [*words, *shrink.args]


def test_every_command_has_a_shrink_entry() -> None:
    found = set(readme_commands()) | set(help_commands())
    assert len(readme_commands()) >= 15 and len(help_commands()) >= 8, "the command extraction found too few"
    assert found - SHRINK.keys() == set(), "commands without an entry in SHRINK (add how they run small)"
    assert SHRINK.keys() - found == set(), "SHRINK entries of commands no longer in the README or --help"
    assert {s.group for s in SHRINK.values()} == {"main", "balance", "distributed"}


# ----------------------------------------------------------------------------------------------------------
# running them


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The working directory of every command: ``configs/``, a tiny CREMA-D-style layout and two images."""
    work = tmp_path_factory.mktemp("readme")
    shutil.copytree(REPO / "configs", work / "configs")
    _write_av_layout(work / CREMA_D)
    Image.new("RGB", (40, 32), (220, 40, 40)).save(work / "some.png")  # for the caption command
    Image.new("RGB", (32, 48), (40, 40, 220)).save(work / "other.jpg")
    return work


@pytest.fixture
def in_workdir(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(workdir)
    yield workdir


def _write_av_layout(root: Path) -> None:
    """CREMA-D as the README's command reads it: ``{train,val,test}.csv``, ``AudioWAV/<clip>.wav`` (16 kHz) and
    ``Image-01-FPS/<clip>/*.jpg``; 3 classes, 4 + 1 + 1 clips each, 0.3 s of tone and 2 frames per clip."""
    rows: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for c, label in enumerate(("ANG", "HAP", "SAD")):
        for i, split in enumerate(["train"] * 4 + ["val", "test"]):
            clip = f"10{c}{i}_{label}"
            rows[split].append(f"{clip},{label}")
            t = torch.arange(int(0.3 * 16000)) / 16000
            (root / "AudioWAV").mkdir(parents=True, exist_ok=True)
            write_wav(root / "AudioWAV" / f"{clip}.wav", 0.5 * torch.sin(2 * math.pi * 200 * (c + 1) * t), 16000)
            frames = root / "Image-01-FPS" / clip
            frames.mkdir(parents=True)
            for k in range(2):
                level = 40 * c + 20 * k + i
                Image.new("RGB", (24, 18), (level, 255 - level, 128)).save(frames / f"{k + 1}.jpg")
    for split, lines in rows.items():
        (root / f"{split}.csv").write_text("clip,label\n" + "\n".join(lines) + "\n")


def _check_writes(cmd: str) -> None:
    missing = [p for p in SHRINK[cmd].writes if not Path(p).is_file()]
    assert not missing, f"{cmd}: exit 0 but did not write {missing}"


def run_in_process(cmd: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``counterpoint ...`` through ``counterpoint.cli.main`` in this process; fails naming the command."""
    argv = argv_of(cmd)
    assert argv[0] == "counterpoint", cmd
    try:
        rc = main(argv[1:])
    except SystemExit as exc:  # argparse
        rc = exc.code
    except Exception as exc:
        pytest.fail(f"{cmd}: raised {type(exc).__name__}: {exc}")
    out, err = capsys.readouterr()
    if rc != 0:
        pytest.fail(f"{cmd}: exit {rc}\nargv: {shlex.join(argv)}\n{(out[-2000:] + err[-3000:]).strip()}")
    _check_writes(cmd)


def run_process(cmd: str) -> None:
    """``torchrun ...`` (as ``python -m torch.distributed.run``) or ``counterpoint launch ...`` (as ``python -m
    counterpoint.cli launch``) in real processes."""
    argv = argv_of(cmd)
    if argv[0] == "torchrun":
        full = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    else:
        assert argv[:2] == ["counterpoint", "launch"], cmd
        full = [sys.executable, "-m", "counterpoint.cli", *argv[1:]]
    src = str(Path(counterpoint.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(full, env=env, capture_output=True, text=True, timeout=400)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if re.search(r"Error|error:", line)]
        pytest.fail(f"{cmd}: exit {proc.returncode}\nargv: {shlex.join(argv)}\n" + "\n".join(errors[-6:])
                    + f"\n--- stderr tail:\n{proc.stderr[-4000:]}")
    _check_writes(cmd)


@pytest.mark.slow
def test_main_chain_and_python_snippet(in_workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Quick start, "Other commands" and the help's examples, then "From Python" on the trained run."""
    for cmd, shrink in SHRINK.items():
        if shrink.group == "main":
            run_in_process(cmd, capsys)
    namespace: dict[str, object] = {"images_uint8": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)}
    try:
        exec(compile(python_snippet(), "README.md (From Python)", "exec"), namespace)
    except Exception as exc:
        pytest.fail(f"README 'From Python' snippet: raised {type(exc).__name__}: {exc}")
    image_emb, text_emb = namespace["image_emb"], namespace["text_emb"]
    assert image_emb.shape[0] == 2 and text_emb.shape == (1, image_emb.shape[1])
    torch.testing.assert_close(image_emb.norm(dim=-1), torch.ones(2))
    assert isinstance(namespace["fresh"], torch.nn.Module)


@pytest.mark.slow
def test_data_and_balance_commands(in_workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The shortcut and audio-visual data commands, and balance train / compare on generated and saved data."""
    for cmd, shrink in SHRINK.items():
        if shrink.group == "balance":
            run_in_process(cmd, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("cmd", DISTRIBUTED, ids=lambda cmd: SHRINK[cmd].args[-1].removeprefix("out_dir=runs/"))
def test_distributed_command(cmd: str, in_workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """torchrun and ``counterpoint launch`` lines in 2 real processes, on the Quick start's world."""
    world = "counterpoint data make world --out data/world"
    if not Path("data/world/world.json").is_file():  # this test alone
        run_in_process(world, capsys)
    run_process(cmd)
