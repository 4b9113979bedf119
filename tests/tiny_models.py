"""A tiny model and one step's batch for it, shared by tests that run an objective through a model."""

import torch

from dmssl.model import SSLModel


class LinearEncoder(torch.nn.Module):
    """One linear layer from 4 inputs to 5 features."""

    feature_dim = 5

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 5)

    def forward(self, x):
        return self.layer(x)


def tiny_model(num_classes: int = 3) -> SSLModel:
    return SSLModel(LinearEncoder(), num_classes=num_classes, proj_hidden_dim=8, proj_dim=6)


def tiny_step_batch(labeled: int = 6, unlabeled: int = 8, num_classes: int = 3) -> dict:
    """A step's batch as the trainer makes it: labeled inputs, then the weak and two strong views of the unlabeled."""
    return {"inputs": torch.randn(labeled + 3 * unlabeled, 4), "labels": torch.arange(labeled) % num_classes,
            "num_unlabeled": unlabeled, "unlabeled_targets": torch.full((unlabeled,), -1)}


def stored_and_rebuilt(run_dir, pretrained: dict) -> tuple[dict, set]:
    """A run's last checkpoint's model entries, those it leaves out to be rebuilt from the pretrained model
    (dmssl/frozen_weights.py) filled in from `pretrained` (an encoder state dict) after checking its digest; and the
    names left out."""
    from dmssl.checkpoint import list_checkpoints, load_checkpoint
    from dmssl.frozen_weights import tensors_digest

    state = load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])
    names = state["frozen"]["names"]
    as_pretrained = {f"encoder.{k}": v for k, v in pretrained.items()}
    assert tensors_digest(as_pretrained, names) == state["frozen"]["digest"]
    assert not set(names) & set(state["model"]) and not set(names) & set(state["ema"]["module"])
    return {**state["model"], **{name: as_pretrained[name] for name in names}}, set(names)
