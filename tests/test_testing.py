"""The conformance kit catches each kind of broken adapter (built on the tabular example)."""

import random
from pathlib import Path

import pytest
import torch

from dmssl.recipe import resolve
from dmssl.testing import AdapterCheckError, check_adapter
from examples.tabular import MLP, TabularModality

CFG = resolve([f"recipe={Path(__file__).parent.parent / 'examples' / 'tabular.yaml'}"])


class WrongWidth(TabularModality):
    def build_encoder(self):
        encoder = MLP(30, 64)
        encoder.feature_dim = 128  # declares more than it returns
        return encoder


class UnseededViews(TabularModality):
    def strong(self, row):
        generator = torch.Generator().manual_seed(random.SystemRandom().randrange(2**31))
        return row + torch.randn(row.shape, generator=generator)  # ignores the core's seed


class DroppingCollate(TabularModality):
    def collate(self, views):
        return torch.stack(views[:-1])  # loses the last sample


class LabelChangingView(TabularModality):
    def load(self):
        raw = super().load()
        self.rows_by_label = {}
        for row, y in zip(raw.train, raw.train_labels):
            self.rows_by_label.setdefault(y, []).append(row)
        self.label_of = {id(row): y for row, y in zip(raw.train, raw.train_labels)}
        return raw

    def strong(self, row):
        # Returns a sample of the other class: the "augmentation" changes the label.
        y = self.label_of.get(id(row), 0)
        return random.choice(self.rows_by_label[1 - y]).clone()


@pytest.mark.parametrize(("adapter", "message"), [
    (WrongWidth, "encoder(batch) returned shape (48, 64), expected (48, 128)"),
    (UnseededViews, "strong view is deterministic under a fixed seed"),
    (DroppingCollate, "collate() of 48 views gave batch sizes [47]"),
    (LabelChangingView, "strong view keeps the label"),
])
def test_check_adapter__catches(adapter, message):
    with pytest.raises(AdapterCheckError) as caught:
        check_adapter(adapter, CFG)
    assert message in str(caught.value)


def test_check_adapter__reports_every_violation_at_once():
    class TwoBugs(UnseededViews, LabelChangingView):
        pass

    with pytest.raises(AdapterCheckError, match="2 adapter check\\(s\\) failed|adapter check\\(s\\) failed") as caught:
        check_adapter(TwoBugs, CFG)
    assert str(caught.value).count("\n  - ") >= 2


def test_check_adapter__shipped_image_adapter_passes():
    cfg = resolve(["recipe=quickstart"])
    from modalities.image import ImageModality

    assert check_adapter(ImageModality, cfg).passed
