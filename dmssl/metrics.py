"""Classification metrics from a confusion matrix: accuracy, macro-F1, per-class accuracy (recall).

Everything derives from one K x K count matrix (rows: true class, columns: predicted class), so the
figures of a distributed evaluation are exact: processes add their matrices, not their accuracies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) int64 counts; entry [i, j] = samples of true class i predicted as j."""
    index = labels.long().flatten() * num_classes + predictions.long().flatten()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


@dataclass
class ClassificationReport:
    """The metrics users read, computed from `matrix`.

    per_class_accuracy[k] = correct of class k / samples of class k (NaN where class k has no sample);
    F1_k = 2 * TP_k / (2 * TP_k + FP_k + FN_k), and macro-F1 is their plain mean over the classes that
    occur (as true or predicted class), as scikit-learn's `f1_score(average="macro")` does with
    `zero_division=0` for classes that occur.
    """

    matrix: torch.Tensor

    @property
    def total(self) -> int:
        return int(self.matrix.sum())

    @property
    def accuracy(self) -> float:
        return float(self.matrix.diagonal().sum()) / max(self.total, 1)

    @property
    def per_class_accuracy(self) -> list[float]:
        support = self.matrix.sum(dim=1).double()
        return [float(c) / float(n) if n > 0 else float("nan") for c, n in zip(self.matrix.diagonal(), support, strict=True)]

    @property
    def macro_f1(self) -> float:
        tp = self.matrix.diagonal().double()
        fp = self.matrix.sum(dim=0).double() - tp
        fn = self.matrix.sum(dim=1).double() - tp
        present = (tp + fp + fn) > 0
        if not present.any():
            return float("nan")
        f1 = 2 * tp / (2 * tp + fp + fn).clamp(min=1)
        return float(f1[present].mean())

    def to_dict(self, class_names: list[str] | None = None) -> dict:
        """JSON-ready: counts, class names, and the derived figures."""
        return {"class_names": class_names, "matrix": self.matrix.tolist(), "accuracy": self.accuracy,
                "macro_f1": self.macro_f1, "per_class_accuracy": self.per_class_accuracy}
