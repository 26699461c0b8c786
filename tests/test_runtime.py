"""How many encoder replicas the runtime builds for indexing on a multi-GPU host."""

import types

import pytest
import torch

from indexer.config import Settings
from indexer.runtime import gpu_replicas


class FakeEncoder:
    def __init__(self, device="cuda:0"):
        self.device = torch.device(device)
        self.made = []

    def replicate(self, device):
        self.made.append(device)
        return FakeEncoder(device)


@pytest.mark.parametrize(
    "device, gpus, visible, expected",
    [
        ("auto", 1, 4, []),  # the default: one GPU
        ("auto", 0, 4, ["cuda:1", "cuda:2", "cuda:3"]),  # 0: all visible
        ("cuda", 2, 4, ["cuda:1"]),
        ("auto", 8, 2, ["cuda:1"]),  # never more than are visible
        ("cuda:2", 0, 4, []),  # a device named explicitly means that one GPU
    ],
)
def test_replicas_follow_the_gpus_setting(monkeypatch, device, gpus, visible, expected):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    paper, passage = FakeEncoder(), FakeEncoder()
    pairs = gpu_replicas(Settings(device=device, gpus=gpus), paper, passage)
    assert paper.made == expected and passage.made == expected
    assert [(str(p.device), str(q.device)) for p, q in pairs] == [(d, d) for d in expected]


def test_no_replicas_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    cpu = types.SimpleNamespace(device=torch.device("cpu"))
    assert gpu_replicas(Settings(gpus=0), cpu, cpu) == []
