"""Shared fixtures. Slow end-to-end tests are marked `slow` and run by default; `-m "not slow"` skips them."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_timm(tmp_path_factory):
    """A tiny random model of timm's EfficientNet family, saved in timm's hub folder layout."""
    import timm
    from timm.models._hub import save_for_hf

    folder = tmp_path_factory.mktemp("tiny-timm")
    torch.manual_seed(0)
    save_for_hf(timm.create_model("test_efficientnet", pretrained=False), str(folder), safe_serialization=True)
    return folder
