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


class DetachedEncoder(TabularModality):
    def build_encoder(self):
        encoder = super().build_encoder()
        forward = encoder.forward
        encoder.forward = lambda x: forward(x).detach()
        return encoder


class DroppingWeakViews(TabularModality):
    def weak_views(self, samples):
        return [self.weak(s) for s in samples][:-1]


class StringLabels(TabularModality):
    def load(self):
        raw = super().load()
        raw.train_labels = [raw.class_names[y] if y >= 0 else -1 for y in raw.train_labels]
        return raw


class ShufflingCollate(TabularModality):
    def collate(self, views):
        batch = torch.stack(views)
        return batch[torch.randperm(len(views), generator=torch.Generator().manual_seed(1))]


class TupleCollate(TabularModality):
    def collate(self, views):
        return (torch.stack(views),)


class ForgetsWhatLoadLearned(TabularModality):
    """Sizes its encoder from the data but keeps that out of inference_state: dmssl.load could not rebuild it."""

    def load(self):
        raw = super().load()
        self.in_features = int(raw.train[0].shape[0])
        return raw

    def build_encoder(self):
        return MLP(in_features=self.in_features, width=self.model.width or 128)


class RemembersWhatLoadLearned(ForgetsWhatLoadLearned):
    def inference_state(self):
        return {"in_features": self.in_features}

    def restore_inference_state(self, state):
        self.in_features = state["in_features"]


def test_check_adapter__an_adapter_that_keeps_what_load_learned_reloads():
    report = check_adapter(RemembersWhatLoadLearned, CFG)
    assert "encoder rebuilds from inference_state" in report.passed_checks


@pytest.mark.parametrize(("adapter", "message"), [
    (ForgetsWhatLoadLearned, "encoder rebuilds from inference_state: a fresh adapter with restore_inference_state"),
    (DetachedEncoder, "gradients reach the encoder: no gradient reached the encoder's parameters (its output has no grad_fn)"),
    (DroppingWeakViews, "weak_views gives one view per sample: weak_views() of 16 samples returned list of length 15"),
    (StringLabels, "labels are class indices (int)"),
    (ShufflingCollate, "collate keeps each sample in its row"),
    (TupleCollate, "collate returns a tensor or a dict of tensors: collate() returned tuple"),
])
def test_check_adapter__reports_instead_of_crashing(adapter, message):
    with pytest.raises(AdapterCheckError) as caught:
        check_adapter(adapter, CFG)
    assert message in str(caught.value)
    if adapter is ShufflingCollate:  # reported as the collate's fault, not as views that change labels
        assert "keeps the label" not in str(caught.value)
