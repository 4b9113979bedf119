"""The trainer's pieces on their own: learning rate, EMA, optimizer groups, data splits, step splitting, resume state."""

import math

import pytest
import torch
from torch import nn

from dmssl.config import TrainerConfig
from dmssl.errors import CheckpointError
from dmssl.objective import split_step
from dmssl.train_state import TrainState
from dmssl.trainer import EMA, build_optimizer, learning_rate


def test_learning_rate__warmup_then_fixmatch_cosine():
    cfg = TrainerConfig(lr=0.1, warmup_steps=10, max_steps=110, cosine_cycles=7 / 16)
    assert learning_rate(0, cfg) == pytest.approx(0.01)
    assert learning_rate(9, cfg) == pytest.approx(0.1)
    assert learning_rate(10, cfg) == pytest.approx(0.1)
    assert learning_rate(60, cfg) == pytest.approx(0.1 * math.cos(math.pi * 7 / 16 * 0.5))
    assert learning_rate(110, cfg) == pytest.approx(0.1 * math.cos(7 * math.pi / 16))  # 0.2 of the peak
    assert learning_rate(50, TrainerConfig(lr=0.1, schedule="constant")) == 0.1


def test_ema__decay_warms_up_and_buffers_are_copied():
    model = nn.BatchNorm1d(2)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(2.0)  # was 1
        model.running_mean.fill_(5.0)
    ema.update(model)  # decay min(0.9, 1/10) = 0.1: mostly the live weights
    assert torch.allclose(ema.module.weight, torch.full((2,), 0.1 * 1 + 0.9 * 2))
    assert torch.equal(ema.module.running_mean, model.running_mean)
    for _ in range(100):
        ema.update(model)
    assert ema.updates == 101 and torch.allclose(ema.module.weight, torch.full((2,), 2.0), atol=1e-4)
    restored = EMA(nn.BatchNorm1d(2), decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 101 and torch.equal(restored.module.weight, ema.module.weight)


def test_build_optimizer__no_decay_on_biases_norms_prototypes_and_head_lr_scale():
    from dmssl.model import SSLModel
    from modalities.image import SmallCNN

    model = SSLModel(SmallCNN(in_channels=1, width=4), 3)
    optimizer = build_optimizer(model, TrainerConfig(weight_decay=0.01, head_lr_scale=5.0))
    by_param = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    assert by_param[id(model.prototype_weights)]["weight_decay"] == 0.0
    assert by_param[id(model.encoder.body[1].weight)]["weight_decay"] == 0.0  # BatchNorm weight (1-D)
    assert by_param[id(model.encoder.body[0].weight)]["weight_decay"] == 0.01
    assert by_param[id(model.head[0].weight)]["lr_scale"] == 5.0
    assert by_param[id(model.encoder.body[0].weight)]["lr_scale"] == 1.0
    assert isinstance(build_optimizer(model, TrainerConfig(optimizer="adamw")), torch.optim.AdamW)


def test_split_step__cuts_labeled_then_each_view_in_order():
    b, u = 2, 3
    z = torch.arange(b + 3 * u, dtype=torch.float32).unsqueeze(1)
    batch = {"labels": torch.zeros(b, dtype=torch.long), "num_unlabeled": u, "unlabeled_targets": torch.zeros(u)}
    emb = split_step(z, batch, ("weak", "strong", "strong"), torch.eye(2), logits=-z)
    assert emb.labeled.flatten().tolist() == [0, 1]
    assert emb.weak.flatten().tolist() == [2, 3, 4]
    assert [s.flatten().tolist() for s in emb.strong] == [[5, 6, 7], [8, 9, 10]]
    assert emb.weak_logits.flatten().tolist() == [-2, -3, -4] and len(emb.strong_logits) == 2
    supervised = split_step(z[:b], batch, (), torch.eye(2))
    assert supervised.weak is None and supervised.strong == [] and supervised.unlabeled_targets is None


def test_train_state__round_trip_and_a_foreign_split_is_refused():
    def make():
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        return TrainState(model, EMA(model, 0.9), torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                          nn.Module(), [1, 2, 3])

    state = make()
    state.model(torch.randn(4, 3)).sum().backward()
    state.optimizer.step()
    state.step, state.elapsed_seconds = 7, 12.5
    saved = state.state_dict({"seed": 0})
    other = make()
    other.load_state_dict(saved)
    assert other.step == 7 and other.elapsed_seconds == 12.5
    assert torch.equal(other.model.weight, state.model.weight)
    assert other.optimizer.state_dict()["state"][0]["momentum_buffer"].shape == (2, 3)
    foreign = make()
    foreign.labeled_indices = [4, 5]
    with pytest.raises(CheckpointError, match="labeled split differs"):
        foreign.load_state_dict(saved, source="step_7.pt")
    wrong_shape = TrainState(nn.Linear(5, 2), EMA(nn.Linear(5, 2), 0.9),
                             torch.optim.SGD(nn.Linear(5, 2).parameters(), lr=0.1), nn.Module(), [1, 2, 3])
    with pytest.raises(CheckpointError, match="does not fit this run's model"):
        wrong_shape.load_state_dict(saved, source="step_7.pt")


def test_init_prototypes_from_labeled__class_means_without_random_draws_and_keeps_the_mode():
    from dmssl.model import SSLModel, init_prototypes_from_labeled

    class Identity(nn.Module):
        feature_dim = 4

        def forward(self, x):
            return x

    class Adapter:  # the two adapter methods the initialisation uses
        def test_view(self, sample):
            return torch.tensor(sample, dtype=torch.float32)

        def collate(self, views):
            return torch.stack(views)

    torch.manual_seed(0)
    model = SSLModel(Identity(), num_classes=3, proj_hidden_dim=8, proj_dim=4)
    samples = [[1.0, 0, 0, 0], [2.0, 0.5, 0, 0], [0, 0, 3.0, 0], [0, 0, 1.0, 1.0]]
    labels = [0, 0, 1, 1]  # no sample of class 2
    untouched = model.prototypes[2].clone()
    model.train()
    rng = torch.get_rng_state()
    init_prototypes_from_labeled(model, Adapter(), samples, labels, batch_size=3)
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    with torch.no_grad():
        model.eval()
        z = model(torch.tensor(samples))
    for k in (0, 1):
        expected = torch.nn.functional.normalize(z[torch.tensor(labels) == k].mean(dim=0), dim=0)
        assert torch.allclose(model.prototypes[k], expected, atol=1e-6)
    assert torch.equal(model.prototypes[2], untouched)
