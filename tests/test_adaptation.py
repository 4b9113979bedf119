"""Adaptation between a labeled source and an unlabeled target: CORAL, the adversary, the shift report,
the transductive test and fixed subsets."""

import json

import numpy as np
import pytest
import torch

from dmssl.adversarial import Adversarial, adversarial_loss, domain_classifier, reverse_gradient
from dmssl.coral import coral
from dmssl.errors import ConfigError
from dmssl.shift_report import mmd2_from_gram, shift_statistics
from tests.test_data import grouped_config, grouped_raw


def test_coral__matches_numpy_covariances():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(9, 3)), rng.normal(size=(14, 3)) * [1.0, 2.0, 0.5]
    expected = ((np.cov(x, rowvar=False) - np.cov(y, rowvar=False)) ** 2).sum() / (4 * 3 * 3)
    value = coral(torch.tensor(x), torch.tensor(y))
    assert float(value) == pytest.approx(expected, rel=1e-5)
    with_means = coral(torch.tensor(x), torch.tensor(y), match_means=True)
    assert float(with_means) == pytest.approx(expected + ((x.mean(0) - y.mean(0)) ** 2).sum(), rel=1e-5)


def test_coral__blind_to_a_mean_shift_unless_asked():
    x = torch.randn(50, 4)
    assert float(coral(x, x + 3.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(coral(x, x + 3.0, match_means=True)) == pytest.approx(4 * 9.0, rel=1e-4)


def test_reverse_gradient__identity_forward_negated_scaled_backward():
    x = torch.randn(5, 3, requires_grad=True)
    out = reverse_gradient(x, 0.5)
    assert torch.equal(out, x)
    out.sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, -0.5))


def test_adversarial_loss__is_balanced_bce_by_hand():
    torch.manual_seed(0)
    classifier = domain_classifier(4, 8, 1)
    x, y = torch.randn(3, 4), torch.randn(7, 4)
    px, py = torch.sigmoid(classifier(x)).squeeze(1), torch.sigmoid(classifier(y)).squeeze(1)
    expected = 0.5 * (-torch.log(px).mean() - torch.log(1 - py).mean())
    assert float(adversarial_loss(classifier, x, y)) == pytest.approx(float(expected), rel=1e-5)


def test_adversarial__classifier_learns_to_separate_while_the_features_are_pushed_together():
    torch.manual_seed(0)
    distance = Adversarial(hidden_dim=16, layers=1)
    distance.prepare(2)
    x = (torch.randn(64, 2) + torch.tensor([2.0, 0.0])).requires_grad_()
    y = torch.randn(64, 2) - torch.tensor([2.0, 0.0])
    # The classifier alone (features fixed): its loss falls well below chance, ln 2.
    optimizer = torch.optim.Adam(distance.parameters(), lr=0.05)
    for _ in range(100):
        optimizer.zero_grad()
        distance(x.detach(), y).backward()
        optimizer.step()
    assert float(distance(x, y)) < 0.3
    # One minimisation step moves the features against the classifier: up its loss, i.e. towards the other side.
    x.grad = None
    distance(x, y).backward()
    assert float(x.grad[:, 0].mean()) > 0  # descending this gradient moves x left, towards y at -2


def test_adversarial__needs_prepare_and_its_options_are_checked():
    with pytest.raises(RuntimeError, match="prepare"):
        Adversarial()(torch.randn(3, 2), torch.randn(3, 2))
    with pytest.raises(ConfigError, match="distance.layers=-1"):
        grouped_config("distance.name=adversarial", "distance.layers=-1")
    with pytest.raises(ConfigError, match="distance.name=adversarial trains a domain classifier.*supervised"):
        grouped_config("distance.name=adversarial", "objective.name=supervised")


@pytest.mark.parametrize("distance", [["distance.name=adversarial"],
                                      ["distance.name=cdan", "distance.entropy_weighting=true"]])
def test_fit__adversary_is_trained_by_the_optimiser_and_checkpointed(tmp_path, distance):
    from dmssl.checkpoint import load_checkpoint
    from dmssl.recipe import resolve
    from dmssl.trainer import fit

    overrides = ["recipe=quickstart", *distance, "trainer.max_steps=4", "trainer.eval_every=4",
                 "trainer.checkpoint_every=2", "data.num_workers=0", "trainer.max_minutes=null",
                 "trainer.mixed_precision=no", "trainer.progress_bar=false", "trainer.save_embeddings=false"]
    fit(resolve([*overrides, f"output_dir={tmp_path / 'a'}"]))
    state = [load_checkpoint(tmp_path / "a" / "checkpoints" / f"step_{s:08d}.pt") for s in (2, 4)]
    key = next(k for k in state[0]["objective"] if k.startswith("distance.classifier") and k.endswith("weight"))
    assert not torch.equal(state[0]["objective"][key], state[1]["objective"][key])  # trained between steps 2 and 4
    # a run resumed from step 2 reads the classifier back and ends where the straight run ended
    import shutil

    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / "checkpoints" / "step_00000004.pt").unlink()
    fit(resolve([*overrides, f"output_dir={tmp_path / 'b'}", "resume=auto"]))
    resumed = load_checkpoint(tmp_path / "b" / "checkpoints" / "step_00000004.pt")
    assert torch.equal(resumed["objective"][key], state[1]["objective"][key])


def test_mmd2_from_gram__equals_the_unbiased_estimator():
    from dmssl.distances import mmd2
    from dmssl.kernels import LinearKernel

    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    joint = torch.cat([x, y])
    gram = joint @ joint.T
    is_x = torch.arange(13) < 5
    assert float(mmd2_from_gram(gram, is_x)) == pytest.approx(float(mmd2(x, y, LinearKernel())), rel=1e-9)


def test_shift_statistics__one_pool_reads_nothing_a_moved_pool_a_shift():
    torch.manual_seed(0)
    same = shift_statistics(torch.randn(60, 8), torch.randn(200, 8), permutations=100)
    assert same.verdict == "nothing to close" and same.p_value > 0.01
    moved = shift_statistics(torch.randn(60, 8), torch.randn(200, 8) + 1.0, permutations=100)
    assert moved.verdict == "a shift to close" and moved.z > 5 and moved.mmd2 > moved.noise_floor
    record = moved.record()
    assert record["verdict"] == "a shift to close" and record["permutations"] == 100
    assert "a shift to close" in moved.describe() and "noise floor" in moved.describe()


def test_transductive_test__is_the_pool_and_needs_a_disjoint_target():
    from dmssl.trainer import split_run_data

    raw = grouped_raw()
    group_of = dict(zip(raw.train, raw.train_groups, strict=True))
    data = split_run_data(raw, grouped_config("data.labeled_groups=[a]", "data.target_groups=[b,c]",
                                              "data.transductive_test=true"))
    assert sorted(data.test) == sorted(s for s, _ in data.pool) and data.transductive
    assert data.test_labels == [raw.train_labels[s] for s in data.test]
    assert {group_of[s] for s in data.test} == {"b", "c"} and not set(data.test) & set(data.dev)
    with pytest.raises(ConfigError, match="data.transductive_test=true tests on the unlabeled pool: set data.target_groups"):
        grouped_config("data.transductive_test=true")
    with pytest.raises(ConfigError, match=r"must be disjoint \(both hold \['b'\]\)"):
        grouped_config("data.labeled_groups=[a,b]", "data.target_groups=[b,c]", "data.transductive_test=true")


def test_train_subset__labeled_dev_and_pool_come_from_one_fixed_part():
    from dmssl.trainer import split_run_data

    raw = grouped_raw()
    parts = []
    for seed in (0, 1):
        data = split_run_data(raw, grouped_config(f"seed={seed}", "data.train_subset=60", "data.subset_seed=5",
                                                  "data.test_subset=20"))
        used = set(data.labeled) | set(data.dev) | {s for s, _ in data.pool}
        assert len(used) == 60
        parts.append((used, data.test, data.labeled))
    assert parts[0][0] == parts[1][0] and parts[0][1] == parts[1][1]  # the same samples for every seed
    assert parts[0][2] != parts[1][2]  # while the labeled draw moves with the seed
    # unlabeled samples are part of what the subset draws from; labels come only from labeled samples in it
    data = split_run_data(grouped_raw(unlabeled=range(500, 620)), grouped_config("data.train_subset=120"))
    pool = {s for s, _ in data.pool}
    assert len(pool | set(data.dev)) == 120 and pool & set(range(500, 620)) and set(data.labeled) < set(range(120))
    with pytest.raises(ConfigError, match="data.subset_seed=-1"):
        grouped_config("data.subset_seed=-1")


def test_fit__summary_records_labels_test_set_and_shift(tmp_path):
    from dmssl.recipe import resolve
    from dmssl.trainer import fit

    fit(resolve(["recipe=quickstart", "trainer.max_steps=2", "trainer.eval_every=2", "data.num_workers=0",
                 "trainer.max_minutes=null", "trainer.mixed_precision=no", "trainer.progress_bar=false",
                 "trainer.save_embeddings=false", f"output_dir={tmp_path}"]))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["labels"] == "a balanced budget" and summary["test_set"] == "held out"
    assert summary["shift"]["verdict"] in ("nothing to close", "a shift to close")
    assert summary["shift"]["num_labeled"] == 50 and summary["shift"]["permutations"] == 200


def test_fit__the_shift_report_changes_nothing_the_run_draws(tmp_path):
    from dmssl.checkpoint import load_checkpoint
    from dmssl.recipe import resolve
    from dmssl.trainer import fit

    common = ["recipe=quickstart", "trainer.max_steps=3", "trainer.eval_every=3", "data.num_workers=0",
              "trainer.max_minutes=null", "trainer.mixed_precision=no", "trainer.progress_bar=false",
              "trainer.save_embeddings=false"]
    with_report = fit(resolve([*common, f"output_dir={tmp_path / 'a'}"]))
    without = fit(resolve([*common, "trainer.shift_report=false", f"output_dir={tmp_path / 'b'}"]))
    assert with_report["shift"] is not None and without["shift"] is None
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "step_00000003.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "step_00000003.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_multilinear_map__is_every_product_of_a_row():
    from dmssl.cdan import multilinear_map

    f, g = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.25, 0.75]])
    expected = torch.tensor([[0.25, 0.75, 0.5, 1.5, 0.75, 2.25]])  # f_a g_k, a-major
    assert torch.allclose(multilinear_map(f, g), expected)


def test_randomized_multilinear_map__keeps_inner_products_on_average():
    from dmssl.cdan import multilinear_map, randomized_multilinear_map

    torch.manual_seed(0)
    f, g = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64).softmax(1)
    exact = multilinear_map(f, g) @ multilinear_map(f, g).T
    r_f, r_g = torch.randn(6, 200_000, dtype=torch.float64), torch.randn(3, 200_000, dtype=torch.float64)
    mapped = randomized_multilinear_map(f, g, r_f, r_g)
    assert torch.allclose(mapped @ mapped.T, exact, atol=0.05 * float(exact.abs().max()))


def test_cdan_loss__is_balanced_bce_on_the_map_by_hand_and_entropy_weighted():
    from dmssl.cdan import Cdan, entropy_weights, multilinear_map

    torch.manual_seed(0)
    distance = Cdan(hidden_dim=8, layers=1)
    distance.prepare(4, num_classes=3)
    x, y = 10 * torch.randn(5, 4), 10 * torch.randn(7, 4)  # far from 0, so that rows' losses differ
    gx, gy = (3 * torch.randn(5, 3)).softmax(1), (3 * torch.randn(7, 3)).softmax(1)
    px = torch.sigmoid(distance.classifier(multilinear_map(x, gx))).squeeze(1)
    py = torch.sigmoid(distance.classifier(multilinear_map(y, gy))).squeeze(1)
    expected = 0.5 * (-torch.log(px).mean() - torch.log(1 - py).mean())
    assert float(distance(x, y, x_probabilities=gx, y_probabilities=gy)) == pytest.approx(float(expected), rel=1e-5)
    # CDAN+E: each side a weighted mean with w = 1 + exp(-H(g))
    wx, wy = entropy_weights(gx), entropy_weights(gy)
    hx = -(gx * gx.log()).sum(1)
    assert torch.allclose(wx, 1 + torch.exp(-hx))
    weighted = 0.5 * ((wx * -torch.log(px)).sum() / wx.sum() + (wy * -torch.log(1 - py)).sum() / wy.sum())
    distance.entropy_weighting = True
    value = distance(x, y, x_probabilities=gx, y_probabilities=gy)
    assert float(value) == pytest.approx(float(weighted), rel=1e-5)
    assert abs(float(value) - float(expected)) > 1e-3  # the weights change the value


def test_cdan__tells_classes_apart_where_dann_cannot_and_never_trains_the_predictions():
    """Two sides with the same marginal but swapped classes: only the conditional adversary sees a difference."""
    from dmssl.cdan import Cdan

    torch.manual_seed(0)
    centres = torch.tensor([[3.0, 0.0], [-3.0, 0.0]])
    classes = torch.arange(128) % 2
    x = centres[classes] + 0.3 * torch.randn(128, 2)
    y = centres[1 - classes] + 0.3 * torch.randn(128, 2)
    gx = torch.nn.functional.one_hot(classes, 2).float()
    gy = gx.clone().requires_grad_()  # y's rows predicted as the class of the other centre
    losses = {}
    for name, distance in (("cdan", Cdan(hidden_dim=16, layers=1)), ("adversarial", Adversarial(hidden_dim=16, layers=1))):
        distance.prepare(2, num_classes=2)
        optimizer = torch.optim.Adam(distance.parameters(), lr=0.05)
        kwargs = {"x_probabilities": gx, "y_probabilities": gy} if name == "cdan" else {}
        for _ in range(150):
            optimizer.zero_grad()
            distance(x, y, **kwargs).backward()
            optimizer.step()
        losses[name] = float(distance(x, y, **kwargs))
    assert losses["cdan"] < 0.2 < 0.6 < losses["adversarial"]
    assert gy.grad is None  # g is detached: the predictions are not trained through D


def test_cdan__randomized_above_max_map_dim_and_its_errors():
    from dmssl.cdan import Cdan

    small, large = Cdan(max_map_dim=4096), Cdan(max_map_dim=4096, randomized_dim=64)
    small.prepare(128, num_classes=10)
    large.prepare(128, num_classes=40)
    assert not small.randomized and small.classifier[0].in_features == 1280
    assert large.randomized and large.classifier[0].in_features == 64 and "r_f" in large.state_dict()
    with pytest.raises(ValueError, match="x_probabilities"):
        small(torch.randn(3, 128), torch.randn(3, 128))
    with pytest.raises(RuntimeError, match="prepare"):
        Cdan()(torch.randn(3, 2), torch.randn(3, 2))
    with pytest.raises(ConfigError, match="distance.randomized_dim=0 must be >= 1"):
        grouped_config("distance.name=cdan", "distance.randomized_dim=0")
    with pytest.raises(ConfigError, match="distance.name=cdan trains a domain classifier.*supervised"):
        grouped_config("distance.name=cdan", "objective.name=supervised")
    with pytest.raises(ConfigError, match="objective.dm_space=features does not keep"):
        grouped_config("distance.name=cdan", "objective.labeled_memory=64", "objective.dm_space=features")


def test_dmssl_with_cdan__passes_each_rows_prototype_prediction():
    from dmssl.cdan import Cdan
    from dmssl.losses import prototype_logits
    from dmssl.objective import build_objective

    seen = {}

    class Recording(Cdan):
        def forward(self, x, y, generator=None, x_probabilities=None, y_probabilities=None):
            seen.update(x=x, y=y, gx=x_probabilities, gy=y_probabilities)
            return super().forward(x, y, generator, x_probabilities, y_probabilities)

    torch.manual_seed(0)
    distance = Recording(hidden_dim=4, layers=1)
    distance.prepare(8, num_classes=3)
    objective = build_objective("dmssl", None, 3, distance)
    unit = lambda n: torch.nn.functional.normalize(torch.randn(n, 8), dim=1)  # noqa: E731
    emb = step_embeddings(unit)
    out = objective(emb, step=0)
    assert torch.isfinite(out.loss)
    t = objective.options.temperature
    assert torch.allclose(seen["gx"], prototype_logits(emb.labeled, emb.prototypes, t).softmax(1))
    assert torch.allclose(seen["gy"], prototype_logits(emb.weak, emb.prototypes, t).softmax(1))
    assert torch.equal(seen["x"], emb.labeled) and torch.equal(seen["y"], emb.weak)
    # matching the encoder's features: the rows are features, the predictions still come from the embeddings z
    from dmssl.objective import DistributionMatching

    distance = Recording(hidden_dim=4, layers=1)
    distance.prepare(5, num_classes=3)
    objective = build_objective("dmssl", DistributionMatching.Options(dm_space="features"), 3, distance)
    emb.labeled_features, emb.weak_features = torch.randn(6, 5), torch.randn(12, 5)
    emb.strong_features = [torch.randn(12, 5), torch.randn(12, 5)]
    assert torch.isfinite(objective(emb, step=0).loss)
    assert torch.equal(seen["x"], emb.labeled_features) and torch.equal(seen["y"], emb.weak_features)
    assert torch.allclose(seen["gx"], prototype_logits(emb.labeled, emb.prototypes, t).softmax(1))
    assert torch.allclose(seen["gy"], prototype_logits(emb.weak, emb.prototypes, t).softmax(1))


def step_embeddings(unit):
    from dmssl.objective import StepEmbeddings

    return StepEmbeddings(labeled=unit(6), labels=torch.tensor([0, 1, 2, 0, 1, 2]), prototypes=unit(3), weak=unit(12),
                          strong=[unit(12), unit(12)], unlabeled_targets=torch.full((12,), -1))

