"""Checkpoints of a run on a frozen pretrained encoder store what trains, not the encoder (dmssl/frozen_weights.py):
resume, dmssl.load and export rebuild it from the pretrained model and check it is the one the run used."""

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import dmssl
from dmssl.checkpoint import list_checkpoints, load_checkpoint
from dmssl.errors import CheckpointError
from dmssl.frozen_weights import rebuildable_names, restore_frozen, tensors_digest
from dmssl.recipe import resolve
from dmssl.trainer import fit
from modalities.image import SmallCNN, TimmEncoder, load_digits
from tests.tiny_models import tiny_model

Q = ["recipe=quickstart", "trainer.progress_bar=false", "data.num_workers=0", "trainer.save_embeddings=false",
     "data.batch_size=8", "data.mu=2", "trainer.mixed_precision=no", "trainer.max_steps=4", "trainer.eval_every=2",
     "trainer.checkpoint_every=2", "trainer.keep_checkpoints=3", "model.encoder=pretrained", "model.freeze=all",
     "modality.pretrained_size=32", "model.cached_views=1"]


def test_only_a_pretrained_encoders_frozen_parameters_are_left_out(tiny_timm):
    from dmssl.model import SSLModel
    from dmssl.pretrained import apply_freeze

    encoder = TimmEncoder(str(tiny_timm), in_channels=1, size=32)
    apply_freeze(encoder, 1)
    names = rebuildable_names(SSLModel(encoder, 3, 8, 4))
    frozen = {f"encoder.{n}" for n, p in encoder.named_parameters() if not p.requires_grad}
    assert names and set(names) == frozen  # the stem only; the stages above it train and are stored
    random_cnn = SmallCNN(in_channels=1)
    apply_freeze(random_cnn, "all")  # random weights: building it again would not give them back
    assert rebuildable_names(SSLModel(random_cnn, 3, 8, 4)) == []
    assert restore_frozen({"model": {"a": 1}}, tiny_model()) == {"model": {"a": 1}}  # a full checkpoint, as is


def test_a_frozen_pretrained_run_stores_no_encoder_weight_and_resumes_loads_and_exports(tiny_timm, tmp_path,
                                                                                        monkeypatch):
    run = [*Q, f"modality.pretrained={tiny_timm}", f"data.cache_dir={tmp_path / 'cache'}"]
    fit(resolve([*run, f"output_dir={tmp_path / 'a'}"]))
    state = load_checkpoint(list_checkpoints(tmp_path / "a" / "checkpoints")[-1])
    encoder = TimmEncoder(str(tiny_timm), in_channels=1, size=32)
    assert state["frozen"]["weights_from"] == str(tiny_timm)
    assert sorted(state["frozen"]["names"]) == sorted(f"encoder.{n}" for n, _ in encoder.named_parameters())
    assert not any(k.startswith("encoder.") and k in state["frozen"]["names"]
                   for k in [*state["model"], *state["ema"]["module"]])
    # killed after step 2: the resumed run ends where the uninterrupted one did
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for path in list_checkpoints(tmp_path / "b" / "checkpoints")[1:]:
        path.unlink()
    hashed = []
    monkeypatch.setattr("dmssl.frozen_weights.tensors_digest",
                        lambda entries, names, real=tensors_digest: hashed.append(names) or real(entries, names))
    fit(resolve([*run, f"output_dir={tmp_path / 'b'}", "resume=auto"]))
    assert len(hashed) == 1  # the resume checks the rebuilt weights once; its saves reuse that digest
    b = load_checkpoint(list_checkpoints(tmp_path / "b" / "checkpoints")[-1])
    assert b["step"] == 4 and set(b["model"]) == set(state["model"])
    assert all(torch.equal(state["model"][k], b["model"][k]) for k in state["model"])
    # the trained model, read from the run folder and from its export (which holds every weight)
    images = load_digits(seed=0).test[:16]
    clf = dmssl.load(tmp_path / "a")
    exported = dmssl.export(tmp_path / "a", tmp_path / "export")
    weights = load_file(exported / "model.safetensors")
    assert set(state["frozen"]["names"]) <= set(weights)
    assert all(torch.equal(weights[k], v) for k, v in encoder.state_dict(prefix="encoder.").items() if k in weights)
    assert np.allclose(dmssl.load(exported).predict_proba(images), clf.predict_proba(images), atol=1e-6)


def test_a_pretrained_model_that_changed_since_the_run_is_an_error_not_another_model(tiny_timm, tmp_path):
    moved = tmp_path / "model"
    shutil.copytree(tiny_timm, moved)
    fit(resolve([*Q, f"modality.pretrained={moved}", f"data.cache_dir={tmp_path / 'cache'}",
                 f"output_dir={tmp_path / 'run'}"]))
    assert dmssl.load(tmp_path / "run").predict(load_digits(seed=0).test[:4]).shape == (4,)
    weights = load_file(moved / "model.safetensors")
    first = sorted(weights)[0]
    weights[first] = weights[first] + 1.0
    from safetensors.torch import save_file

    save_file(weights, moved / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"does not store its frozen encoder's weights: they are rebuilt from the "
                                              r"pretrained model '.*model', but the encoder built now has other weights"):
        dmssl.load(tmp_path / "run")
    with pytest.raises(CheckpointError, match="point modality.pretrained at the model the run was trained with"):
        fit(resolve([*Q, f"modality.pretrained={moved}", f"data.cache_dir={tmp_path / 'cache'}",
                     "trainer.max_steps=6", f"output_dir={tmp_path / 'run'}", "resume=auto"]))
