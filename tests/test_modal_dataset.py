"""ModalDataset: the in-memory contract of balanced multimodal learning, and its no-pickle file format."""

import pytest
import torch

from counterpoint.data.multimodal import ModalDataset, ModalSplit
from counterpoint.errors import DataError


def _dataset() -> ModalDataset:
    g = torch.Generator().manual_seed(0)
    splits = {s: ModalSplit({"audio": torch.randn(n, 5, 4, generator=g),
                             "visual": torch.randint(0, 255, (n, 2, 3, 8, 8), generator=g, dtype=torch.uint8)},
                            torch.randint(0, 3, (n,), generator=g))
              for s, n in (("train", 7), ("val", 3), ("test", 4))}
    return ModalDataset("toy", ["a", "b", "c"], splits, {"seed": 0})


def test_round_trip(tmp_path):
    ds = _dataset()
    ds.save(tmp_path / "toy")
    back = ModalDataset.load(tmp_path / "toy")
    assert back.name == "toy" and back.classes == ["a", "b", "c"] and back.info == {"seed": 0}
    assert back.modalities == ["audio", "visual"]
    for s in ("train", "val", "test"):
        assert torch.equal(back.splits[s].labels, ds.splits[s].labels)
        for m in ds.modalities:
            assert back.splits[s].inputs[m].dtype == ds.splits[s].inputs[m].dtype
            assert torch.equal(back.splits[s].inputs[m], ds.splits[s].inputs[m])


def test_length_checks():
    with pytest.raises(ValueError, match="modality 'audio' has 2 samples but there are 3 labels"):
        ModalSplit({"audio": torch.zeros(2, 1)}, torch.zeros(3, dtype=torch.long))


def test_unreadable_file_is_a_data_error(tmp_path):
    ds = _dataset()
    path = ds.save(tmp_path / "toy")
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="unreadable"):
        ModalDataset.load(path)
    with pytest.raises(DataError, match="no dataset"):
        ModalDataset.load(tmp_path / "missing")
