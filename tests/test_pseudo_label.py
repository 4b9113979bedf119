"""Pseudo-labellers against hand computations from their papers' equations, and how weights enter the losses."""

import math

import pytest
import torch
import torch.nn.functional as F

from dmssl.losses import weighted_supcon
from dmssl.objective import StepEmbeddings, build_objective
from dmssl.pseudo_label import FixedThreshold, FreeMatchThreshold, SoftMatchWeights, build_pseudo_labeller

PROBS = torch.tensor([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.4, 0.35, 0.25], [0.1, 0.1, 0.8]])


def test_fixed__mask_at_the_threshold_inclusive():
    result = FixedThreshold(FixedThreshold.Options(threshold=0.6), 3)(PROBS)
    assert result.targets.tolist() == [0, 1, 0, 2]
    assert result.weights.tolist() == [1.0, 1.0, 0.0, 1.0]
    assert result.confidence.tolist() == pytest.approx([0.7, 0.6, 0.4, 0.8])


def test_freematch__one_step_by_hand():
    m = 0.5
    labeller = FreeMatchThreshold(FreeMatchThreshold.Options(momentum=m), 3)
    result = labeller(PROBS)
    # tau_1 = m / C + (1 - m) mean_b max q_b;  p_1(c) = m / C + (1 - m) mean_b q_b(c)
    tau = m / 3 + (1 - m) * (0.7 + 0.6 + 0.4 + 0.8) / 4
    p = [m / 3 + (1 - m) * (0.7 + 0.3 + 0.4 + 0.1) / 4, m / 3 + (1 - m) * (0.2 + 0.6 + 0.35 + 0.1) / 4,
         m / 3 + (1 - m) * (0.1 + 0.1 + 0.25 + 0.8) / 4]
    class_tau = [pc / max(p) * tau for pc in p]
    expected = [float(c >= class_tau[k]) for c, k in [(0.7, 0), (0.6, 1), (0.4, 0), (0.8, 2)]]
    assert float(labeller.global_threshold) == pytest.approx(tau)
    assert labeller.class_thresholds().tolist() == pytest.approx(class_tau)
    assert result.weights.tolist() == expected
    assert expected == [1.0, 1.0, 0.0, 1.0]  # sample 2 (0.4) is below class 0's threshold (0.4578)


def test_freematch__starts_permissive_and_tightens_as_confidence_grows():
    labeller = FreeMatchThreshold(FreeMatchThreshold.Options(momentum=0.9), 10)
    confident = F.one_hot(torch.arange(10), 10).float() * 0.99 + 0.001
    first = float(labeller.global_threshold)
    for _ in range(50):
        labeller(confident)
    assert first == pytest.approx(0.1) and float(labeller.global_threshold) > 0.95


def test_softmatch__one_step_by_hand():
    m, n_sigma = 0.5, 2.0
    labeller = SoftMatchWeights(SoftMatchWeights.Options(momentum=m, n_sigma=n_sigma, distribution_alignment=False), 3)
    result = labeller(PROBS)
    conf = [0.7, 0.6, 0.4, 0.8]
    mean = sum(conf) / 4
    var = sum((c - mean) ** 2 for c in conf) / 3  # unbiased
    mu = m / 3 + (1 - m) * mean
    sigma2 = m * 1.0 + (1 - m) * var
    expected = [1.0 if c >= mu else math.exp(-((c - mu) ** 2) / (2 * sigma2 / n_sigma**2)) for c in conf]
    assert float(labeller.confidence_mean) == pytest.approx(mu)
    assert float(labeller.confidence_var) == pytest.approx(sigma2)
    assert result.weights.tolist() == pytest.approx(expected)
    assert all(0 < w <= 1 for w in result.weights.tolist())


def test_softmatch__uniform_alignment_on_by_default_and_changes_the_weights():
    aligned = build_pseudo_labeller("softmatch", None, 3)
    assert aligned.options.distribution_alignment is True
    plain = SoftMatchWeights(SoftMatchWeights.Options(distribution_alignment=False), 3)
    skewed = torch.tensor([[0.8, 0.1, 0.1]] * 6 + [[0.3, 0.4, 0.3]] * 2)
    assert not torch.allclose(aligned(skewed).confidence, plain(skewed).confidence)


def test_alignment__by_hand():
    labeller = FixedThreshold(FixedThreshold.Options(distribution_alignment=True, alignment_momentum=0.5,
                                                     threshold=0.5), 2)
    probs = torch.tensor([[0.9, 0.1], [0.7, 0.3]])
    result = labeller(probs)
    running = 0.5 * torch.tensor([0.5, 0.5]) + 0.5 * probs.mean(0)  # [0.65, 0.35]
    aligned = probs * (0.5 / running)
    aligned = aligned / aligned.sum(1, keepdim=True)
    assert torch.allclose(labeller.prediction_mean, running)
    assert result.confidence.tolist() == pytest.approx(aligned.max(1).values.tolist())


def test_running_statistics_are_buffers_saved_with_the_objective():
    labeller = build_pseudo_labeller("freematch", None, 3)
    objective = build_objective("fixmatch", None, 3, pseudo_labeller=labeller)
    keys = set(objective.state_dict())
    assert {"pseudo_labeller.global_threshold", "pseudo_labeller.class_mean", "pseudo_labeller.prediction_mean"} <= keys


def unit(*shape):
    return F.normalize(torch.randn(*shape), dim=-1)


class ConstantWeights(FixedThreshold):
    """A labeller that hands out fixed weights, to test how a weight enters the losses."""

    def __init__(self, weights):
        super().__init__(FixedThreshold.Options(), 3)
        self.fixed = torch.tensor(weights)

    def weights(self, probs, confidence, targets):
        return self.fixed


def step_embeddings(u=4):
    torch.manual_seed(3)
    prototypes = unit(3, 8)
    return StepEmbeddings(labeled=unit(3, 8), labels=torch.arange(3), prototypes=prototypes, weak=unit(u, 8),
                          strong=[unit(u, 8), unit(u, 8)], unlabeled_targets=torch.full((u,), -1))


def test_fixmatch__unlabeled_term_is_the_weighted_mean_of_ce():
    emb = step_embeddings()
    weights = [1.0, 0.25, 0.0, 0.6]
    out = build_objective("fixmatch_proto", None, 3, pseudo_labeller=ConstantWeights(weights))(emb, 0)
    targets = (emb.weak @ emb.prototypes.T).argmax(1)
    ce = F.cross_entropy(emb.strong[0] @ emb.prototypes.T / 0.1, targets, reduction="none")
    assert float(out.logs["loss_unlabeled"]) == pytest.approx(float((ce * torch.tensor(weights)).mean()), rel=1e-5)
    assert float(out.logs["mask_rate"]) == pytest.approx(sum(weights) / 4)


def test_sscl__weight_at_least_half_joins_the_class_with_that_anchor_weight_else_a_simclr_pair():
    emb = step_embeddings()
    weights = [1.0, 0.7, 0.3, 0.0]
    out = build_objective("sscl", None, 3, pseudo_labeller=ConstantWeights(weights))(emb, 0)
    pseudo = (emb.weak @ emb.prototypes.T).argmax(1)
    member = torch.tensor(weights) >= 0.5
    ids = torch.where(member, pseudo, 3 + torch.arange(4))
    labels = torch.cat([torch.arange(3), emb.labels, ids, ids])
    anchor = torch.where(member, torch.tensor(weights), torch.tensor(1.0))  # unconfident_weight = 1
    all_weights = torch.cat([torch.zeros(3), torch.ones(3), anchor, anchor])
    z = torch.cat([emb.prototypes, emb.labeled, emb.strong[0], emb.strong[1]])
    expected = weighted_supcon(z, labels, all_weights, 0.1)
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-5)
