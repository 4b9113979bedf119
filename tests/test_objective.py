"""The objective's terms on tiny tensors."""

import pytest
import torch
import torch.nn.functional as F

from dmssl.distances import build_distance
from dmssl.losses import align_distribution, masked_cross_entropy, prototype_logits, pseudo_labels, weighted_supcon
from dmssl.objective import OBJECTIVES, StepEmbeddings, build_objective, split_step
from dmssl.pseudo_label import FixedThreshold


def unit(*shape):
    return F.normalize(torch.randn(*shape), dim=-1)


def test_weighted_supcon__prototypes_only_equals_prototype_cross_entropy():
    # One labeled anchor, compared only with the K prototypes: SupCon reduces to CE(z . P / T, y).
    k, d, t = 5, 8, 0.1
    prototypes, z, y = unit(k, d), unit(1, d), torch.tensor([3])
    embeddings = torch.cat([prototypes, z])
    labels = torch.cat([torch.arange(k), y])
    weights = torch.cat([torch.zeros(k), torch.ones(1)])
    loss = weighted_supcon(embeddings, labels, weights, t)
    expected = F.cross_entropy(prototype_logits(z, prototypes, t), y)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)


def test_weighted_supcon__reference_implementation():
    # A direct loop over anchors and positives, written from the formula.
    n, d, t = 7, 4, 0.2
    z, labels, w = unit(n, d), torch.tensor([0, 0, 1, 1, 1, 2, 3]), torch.tensor([1.0, 0.5, 1, 1, 0, 2, 1])
    total, weight_sum = 0.0, 0.0
    for i in range(n):
        positives = [p for p in range(n) if p != i and labels[p] == labels[i]]
        if not positives or w[i] == 0:
            continue
        denominator = sum(torch.exp(z[i] @ z[a] / t) for a in range(n) if a != i)
        loss_i = -sum(torch.log(torch.exp(z[i] @ z[p] / t) / denominator) for p in positives) / len(positives)
        total += float(w[i] * loss_i)
        weight_sum += float(w[i])
    assert float(weighted_supcon(z, labels, w, t)) == pytest.approx(total / weight_sum, rel=1e-5)


def test_weighted_supcon__simclr_pair_only_positive_is_other_view():
    a, b, c = unit(3, 6)
    z = torch.stack([a, b, c])
    loss = weighted_supcon(z, torch.tensor([10, 10, 11]), torch.tensor([1.0, 0.0, 0.0]), 0.5)
    logits = torch.stack([a @ b, a @ c]) / 0.5
    assert float(loss) == pytest.approx(float(-torch.log_softmax(logits, 0)[0]), rel=1e-6)


def test_pseudo_labels__threshold_and_mask():
    logits = torch.tensor([[10.0, 0.0], [0.1, 0.0], [0.0, 8.0]])
    labels, mask, confidence = pseudo_labels(logits, threshold=0.95)
    assert labels.tolist() == [0, 0, 1]
    assert mask.tolist() == [True, False, True]
    assert confidence[1] < 0.95


def test_masked_cross_entropy__divides_by_all_rows():
    logits, targets = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    mask = torch.tensor([True, False, False, True])
    per_row = F.cross_entropy(logits, targets, reduction="none")
    assert float(masked_cross_entropy(logits, targets, mask)) == pytest.approx(float((per_row[0] + per_row[3]) / 4))


def embeddings(k=3, b=6, u=8, d=16, confident=False):
    prototypes = unit(k, d)
    labels = torch.arange(b) % k
    labeled = F.normalize(prototypes[labels] + 0.01 * torch.randn(b, d), dim=1)
    targets = torch.arange(u) % k
    weak = F.normalize(prototypes[targets] * (10.0 if confident else 0.0) + torch.randn(u, d) * 0.01, dim=1)
    strong = [unit(u, d), unit(u, d)]
    labeled = labeled.requires_grad_()
    # Linear-head logits (fixmatch) that agree with the prototype classifier on these synthetic embeddings.
    return StepEmbeddings(labeled=labeled, labels=labels, prototypes=prototypes, weak=weak, strong=strong,
                          unlabeled_targets=targets, labeled_logits=labeled @ prototypes.T / 0.1,
                          weak_logits=weak @ prototypes.T / 0.1, strong_logits=[s @ prototypes.T / 0.1 for s in strong])


@pytest.mark.parametrize("name", ["supervised", "fixmatch", "fixmatch_proto", "sscl", "dmssl"])
def test_objectives__finite_loss_and_logged_terms(name):
    options = OBJECTIVES.get(name).Options()
    objective = build_objective(name, options, 3, build_distance("mmd"))
    out = objective(embeddings(confident=True), step=0)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert "loss" in out.logs
    if name != "supervised":
        assert float(out.logs["mask_rate"]) == 1.0
        assert float(out.logs["pseudo_label_accuracy"]) == 1.0
    if name == "dmssl":
        assert float(out.logs["distance"]) == pytest.approx(float(out.logs["loss_dm"]) / options.lambda_dm)


def test_dmssl__is_sscl_plus_weighted_distance():
    emb = embeddings()
    distance = build_distance("mmd")
    sscl = build_objective("sscl", None, 3)(emb, 0).loss
    options = OBJECTIVES.get("dmssl").Options(lambda_dm=2.5)
    total = build_objective("dmssl", options, 3, distance)(emb, 0).loss
    assert float(total) == pytest.approx(float(sscl) + 2.5 * float(distance(emb.labeled, emb.weak)), rel=1e-5)


def test_dmssl__warmup_ramps_lambda():
    emb = embeddings()
    options = OBJECTIVES.get("dmssl").Options(lambda_dm=1.0, dm_warmup_steps=10)
    objective = build_objective("dmssl", options, 3, build_distance("cosine"))
    assert float(objective(emb, 0).logs["loss_dm"]) == pytest.approx(0.1 * float(objective(emb, 0).logs["distance"]))
    assert float(objective(emb, 20).logs["loss_dm"]) == pytest.approx(float(objective(emb, 20).logs["distance"]))


def test_dmssl__class_conditional_only_uses_confident_classes():
    emb = embeddings(confident=True)
    options = OBJECTIVES.get("dmssl").Options(class_conditional=True)
    out = build_objective("dmssl", options, 3, build_distance("mmd", estimator="biased"))(emb, 0)
    groups = []
    for k in range(3):
        x, y = emb.labeled[emb.labels == k], emb.weak[emb.unlabeled_targets == k]
        groups.append(build_distance("mmd", estimator="biased")(x, y))
    assert float(out.logs["distance"]) == pytest.approx(float(torch.stack(groups).mean()), rel=1e-5)


def test_fixmatch__no_confident_samples_means_no_unlabeled_loss():
    emb = embeddings(confident=False)
    out = build_objective("fixmatch", None, 3)(emb, 0)
    assert float(out.logs["mask_rate"]) == 0.0
    assert float(out.logs["loss_unlabeled"]) == 0.0


def test_align_distribution__reweights_and_renormalises():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    aligned = align_distribution(probs, torch.tensor([0.5 / 0.75, 0.5 / 0.25]))
    expected = torch.tensor([[0.9 / 0.75, 0.1 / 0.25], [0.6 / 0.75, 0.4 / 0.25]])
    assert torch.allclose(aligned, expected / expected.sum(dim=1, keepdim=True))


def test_distribution_alignment__breaks_a_collapse_onto_one_class():
    # Synthetic: every unlabeled sample sits nearer prototype 0 (p ~ 0.98 at T=0.1): without
    # alignment all are confidently class 0; with it the running mean learns the skew and the
    # class-0 pseudo-labels lose their confidence.
    prototypes = torch.eye(2, 4)
    weak = F.normalize(torch.tensor([[1.0, 0.6, 0.0, 0.0]]).repeat(8, 1) + 0.01 * torch.randn(8, 4), dim=1)
    emb = StepEmbeddings(labeled=prototypes.clone(), labels=torch.arange(2), prototypes=prototypes, weak=weak,
                         strong=[weak, weak], unlabeled_targets=torch.arange(8) % 2)
    plain = build_objective("fixmatch_proto", None, 2)
    assert float(plain(emb, 0).logs["mask_rate"]) == 1.0
    labeller = FixedThreshold(FixedThreshold.Options(distribution_alignment=True, alignment_momentum=0.5), 2)
    aligned = build_objective("fixmatch_proto", None, 2, pseudo_labeller=labeller)
    rates = [float(aligned(emb, step).logs["mask_rate"]) for step in range(10)]
    assert rates[-1] == 0.0
    assert float(aligned.pseudo_labeller.prediction_mean[0]) > 0.9
    assert "prediction_max_share" in aligned(emb, 10).logs


def test_distribution_alignment__off_leaves_the_running_mean_untouched():
    objective = build_objective("sscl", None, 3)
    objective(embeddings(confident=True), 0)
    assert torch.allclose(objective.pseudo_labeller.prediction_mean, torch.full((3,), 1 / 3))


def test_fixmatch__is_the_published_linear_head_loss_by_hand():
    from dmssl.objective import split_step

    torch.manual_seed(1)
    b, u, k = 3, 4, 3
    z = unit(b + 2 * u, 8)
    logits = torch.randn(b + 2 * u, k) * 3
    batch = {"labels": torch.tensor([0, 1, 2]), "num_unlabeled": u, "unlabeled_targets": torch.full((u,), -1)}
    emb = split_step(z, batch, ("weak", "strong"), unit(k, 8), logits)
    objective = build_objective("fixmatch", OBJECTIVES.get("fixmatch").Options(lambda_u=2.0), k,
                                pseudo_labeller=FixedThreshold(FixedThreshold.Options(threshold=0.7), k))
    out = objective(emb, 0)
    weak, strong = logits[b:b + u], logits[b + u:]
    confidence, targets = weak.softmax(1).max(1)
    mask = (confidence >= 0.7).float()
    unlabeled = (F.cross_entropy(strong, targets, reduction="none") * mask).mean()
    expected = F.cross_entropy(logits[:b], batch["labels"]) + 2.0 * unlabeled
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-6)
    assert objective.head == "linear" and build_objective("fixmatch_proto", None, k).head == "prototype"


def test_linear_head_model__predicts_with_the_classifier_and_keeps_the_prototype_models_init():
    from dmssl.model import SSLModel
    from modalities.image import SmallCNN

    torch.manual_seed(0)
    plain = SSLModel(SmallCNN(in_channels=1, width=8), 3)
    torch.manual_seed(0)
    linear = SSLModel(SmallCNN(in_channels=1, width=8), 3, linear_head=True)
    for key, value in plain.state_dict().items():  # the classifier is created last: nothing else moves
        assert torch.equal(value, linear.state_dict()[key]), key
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    linear.eval()
    z, logits = linear(images, with_logits=True)
    assert torch.equal(linear.predict(images), logits.argmax(1)) and z.shape == (5, 128)
    with pytest.raises(ValueError, match="linear_head=True"):
        plain(images, with_logits=True)


def test_dmssl__labeled_memory_adds_earlier_steps_detached_and_survives_a_checkpoint():
    options = OBJECTIVES.get("dmssl").Options(labeled_memory=8)
    objective = build_objective("dmssl", options, 3, build_distance("mmd", estimator="biased"))
    first, second = embeddings(b=6), embeddings(b=6)
    objective(first, 0)
    assert objective.memory.shape == (6, 16) and not objective.memory.requires_grad
    out = objective(second, 1)
    # Step 1 matches its own 6 labeled embeddings plus the 6 remembered from step 0.
    expected = build_distance("mmd", estimator="biased")(torch.cat([second.labeled, first.labeled.detach()]), second.weak)
    assert float(out.logs["distance"]) == pytest.approx(float(expected), rel=1e-5)
    assert objective.memory.shape == (8, 16)  # FIFO: the newest 8 of 12
    assert torch.equal(objective.memory[-6:], second.labeled.detach())
    restored = build_objective("dmssl", options, 3, build_distance("mmd", estimator="biased"))
    restored.load_state_dict(objective.state_dict())
    assert torch.equal(restored.memory, objective.memory) and torch.equal(restored.memory_labels, objective.memory_labels)
    plain = build_objective("dmssl", None, 3, build_distance("mmd"))
    plain(first, 0)
    assert plain.memory.numel() == 0


def test_dmssl__features_space_matches_the_encoder_features_and_bypasses_the_head():
    from dmssl.objective import run_objective
    from tests.tiny_models import tiny_model, tiny_step_batch

    emb = embeddings()
    emb.labeled_features, emb.weak_features = torch.randn(6, 5) * 3, torch.randn(8, 5) * 3
    emb.strong_features = [torch.randn(8, 5), torch.randn(8, 5)]
    distance = build_distance("mmd")
    options = OBJECTIVES.get("dmssl").Options(dm_space="features", lambda_dm=2.0)
    objective = build_objective("dmssl", options, 3, distance)
    assert objective.needs_features and not build_objective("dmssl", None, 3, distance).needs_features
    sscl = build_objective("sscl", None, 3)(emb, 0).loss
    total = objective(emb, 0).loss
    assert float(total) == pytest.approx(float(sscl) + 2.0 * float(distance(emb.labeled_features, emb.weak_features)),
                                         rel=1e-5)

    # Through a model: the step's features reach the objective, and only the matching term's gradient is
    # checked here: the encoder gets it, the projection head does not.
    torch.manual_seed(0)
    model, batch = tiny_model(), tiny_step_batch()
    options = OBJECTIVES.get("dmssl").Options(dm_space="features", lambda_dm=1.0)
    objective = build_objective("dmssl", options, 3, distance)
    out = run_objective(model, objective, batch, 0, model.prototypes)
    z, features = model(batch["inputs"], with_features=True)
    assert torch.allclose(out.logs["distance"], distance(features[:6], features[6:14]), atol=1e-6)
    emb = split_step(z, batch, objective.unlabeled_views, model.prototypes, None, features)
    grads = torch.autograd.grad(objective.match(emb, *objective.pseudo_label(emb)[:2], 0),
                                [model.encoder.layer.weight, model.head[0].weight], allow_unused=True)
    assert grads[0] is not None and grads[0].abs().sum() > 0 and grads[1] is None
