"""`data.dataset=hf`: any Hugging Face `datasets` data set, for every modality.

Where the rows come from, first match wins:
    data.root = a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`
    data.root = a Parquet or Arrow file, or a folder of them: files whose names start with the split name
                (train-00000.parquet, test.arrow, unsup.parquet) form that split
    data.hub_name = a name on the hub (`datasets.load_dataset(hub_name, hub_config)`), where it is reachable

Splits: `data.train_split` and `data.test_split` (default train, test), and optionally
`data.unlabeled_split` (e.g. IMDB's `unsupervised`): its rows are unlabeled data. Rows with label -1 (or
null) in the train split are unlabeled too. Which column holds the sample and which the label is the
adapter's business (`modality.image_column`, `modality.audio_column`, `modality.text_column`,
`modality.label_column`); this module hands it the columns and the class names.

Class names: a `ClassLabel` label feature gives them; integer labels are named "0", "1", ...; string labels
are sorted and numbered.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmssl.config import DataConfig
from dmssl.errors import DataError

TABLE_FILE_SUFFIXES = (".parquet", ".arrow")


@dataclass
class HFColumns:
    """One column's values per split, with integer labels (-1: unlabeled) and the class names."""

    train: list[Any]
    train_labels: list[int]
    test: list[Any]
    test_labels: list[int]
    unlabeled: list[Any]
    class_names: list[str]


def load_hf_splits(data: DataConfig) -> dict[str, Any]:
    """The data set's splits as `datasets.Dataset` objects, keyed by split name."""
    try:
        import datasets
    except ImportError:
        raise DataError("data.dataset=hf needs the `datasets` package (pip install datasets)") from None
    if data.root:
        root = Path(data.root)
        if not root.exists():
            raise DataError(f"data.root={str(root)!r} does not exist; expected a save_to_disk folder or Parquet/Arrow files")
        if root.is_dir() and any((root / name).is_file() for name in ("dataset_dict.json", "state.json")):
            try:
                loaded = datasets.load_from_disk(str(root))
            except Exception as err:  # a corrupt dataset_dict.json / state.json, a missing split folder, ...
                raise DataError(f"data.root={str(root)!r} is a broken save_to_disk folder ({type(err).__name__}: "
                                f"{str(err)[:200]})") from None
            return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {data.train_split: loaded}
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in TABLE_FILE_SUFFIXES)
        if not files:
            raise DataError(f"data.root={str(root)!r} holds no save_to_disk data set and no .parquet or .arrow file")
        if len({p.suffix for p in files}) > 1:
            raise DataError(f"data.root={str(root)!r} mixes .parquet and .arrow files; keep one format")
        return load_table_files(datasets, root, files, data)
    if data.hub_name:
        try:
            return dict(datasets.load_dataset(data.hub_name, data.hub_config))
        except Exception as err:  # ConnectionError, FileNotFoundError, DatasetNotFoundError, ...
            raise DataError(f"data.hub_name={data.hub_name!r} could not be loaded ({type(err).__name__}: {err}); offline, "
                            "save it once with save_to_disk (or as Parquet) and set data.root to that folder") from None
    raise DataError("data.dataset=hf needs data.root (a save_to_disk folder, Parquet or Arrow files) or data.hub_name")


def load_table_files(datasets: Any, root: Path, files: list[Path], data: DataConfig) -> dict[str, Any]:
    """Parquet or Arrow files, each in the split its name (or a folder's name) starts with. Where no file names
    a split, all of them are the training split; where some do, the others (say `validation-*`) are left out
    with a warning, never added to another split."""
    by_split: dict[str, list[str]] = {}
    unnamed: list[Path] = []
    for path in files:
        parts = path.relative_to(root).parts if path != root else (path.name,)
        split = next((s for s in split_names(data) if any(part.startswith(s) for part in parts)), None)
        if split is None:
            unnamed.append(path)
        else:
            by_split.setdefault(split, []).append(str(path))
    if not by_split:
        by_split = {data.train_split: [str(p) for p in unnamed]}
    elif unnamed:
        warnings.warn(f"data.root: left out {len(unnamed)} file(s) whose names start with no split name "
                      f"({', '.join(split_names(data))}): {', '.join(p.name for p in unnamed[:3])}", stacklevel=3)
    builder = "parquet" if files[0].suffix == ".parquet" else "arrow"
    try:
        return dict(datasets.load_dataset(builder, data_files=by_split))
    except Exception as err:  # garbage bytes, a truncated file, schemas that differ between files
        raise DataError(f"data.root={str(root)!r}: the {builder} files cannot be read ({type(err).__name__}: "
                        f"{str(err)[:200]})") from None


def split_names(data: DataConfig) -> list[str]:
    # Longest first, so that "train_unlabeled" is not taken for "train".
    names = [data.train_split, data.test_split] + ([data.unlabeled_split] if data.unlabeled_split else [])
    return sorted(names, key=len, reverse=True)


def hf_columns(data: DataConfig, column: str, label_column: str, feature: Any = None,
               class_names: list[str] | None = None) -> HFColumns:
    """Read `column` (cast to `feature`, e.g. `datasets.Image(decode=False)`, when given) and the labels.

    `class_names` (the adapter's option, where it has one) names integer labels and orders string labels.
    """
    splits = load_hf_splits(data)
    for wanted in (data.train_split, data.test_split, data.unlabeled_split):
        if wanted and wanted not in splits:
            raise DataError(f"the data set has no split {wanted!r}; its splits: {', '.join(sorted(splits))} "
                            "(set data.train_split / data.test_split / data.unlabeled_split)")
    train, test = splits[data.train_split], splits[data.test_split]
    for name, split in ((data.train_split, train), (data.test_split, test)):
        if len(split) == 0:
            raise DataError(f"split {name!r} of data.root is empty")
    for name, split in ((data.train_split, train), (data.test_split, test)):
        for needed in (column, label_column):
            if needed not in split.column_names:
                raise DataError(f"split {name!r} has no column {needed!r}; its columns: {', '.join(split.column_names)}")
    names = label_names(train, label_column, class_names)

    def read(split: Any, labeled: bool) -> tuple[list[Any], list[int]]:
        if column not in split.column_names:
            raise DataError(f"a split has no column {column!r}; its columns: {', '.join(split.column_names)}")
        if feature is not None:
            split = split.cast_column(column, feature)
        values = list(split[column])
        if not labeled:
            return values, [-1] * len(values)
        return values, [to_index(y, names, label_column) for y in list(split[label_column])]

    train_values, train_labels = read(train, True)
    test_values, test_labels = read(test, True)
    if any(y < 0 for y in test_labels):
        raise DataError(f"split {data.test_split!r} has rows without a label; every test row needs one")
    unlabeled = read(splits[data.unlabeled_split], False)[0] if data.unlabeled_split else []
    return HFColumns(train_values, train_labels, test_values, test_labels, unlabeled, names)


def label_names(split: Any, label_column: str, class_names: list[str] | None) -> list[str]:
    feature = split.features[label_column]
    if getattr(feature, "names", None):  # ClassLabel
        return list(class_names or feature.names)
    labels = [y for y in list(split[label_column]) if y is not None and y != -1]
    if not labels:
        raise DataError(f"column {label_column!r} holds no label")
    for y in labels:
        check_label(y, label_column)
    if all(isinstance(y, str) for y in labels):
        return list(class_names) if class_names else sorted(set(labels))
    if class_names:
        return list(class_names)
    return [str(k) for k in range(int(max(labels)) + 1)]


def check_label(label: Any, column: str) -> None:
    """A class label is a string or a whole number (a float such as 2.0 counts; 1.7 or a list does not)."""
    if isinstance(label, str):
        return
    if isinstance(label, bool) or not isinstance(label, (int, float)) or not float(label).is_integer():
        raise DataError(f"column {column!r} holds the label {label!r} ({type(label).__name__}); labels must be class "
                        "names (strings) or class indices (whole numbers), one per row")


def to_index(label: Any, names: list[str], column: str = "label") -> int:
    if label is None or label == -1:
        return -1
    if isinstance(label, str):
        if label not in names:
            raise DataError(f"label {label!r} is not one of the classes {names}")
        return names.index(label)
    check_label(label, column)
    return int(label)


def decode_encoded(values: list[Any], decode: Callable[[bytes], Any], column: str, split: str, kind: str) -> list[Any]:
    """Decode a column read with `decode=False` ({"bytes", "path"} per row: bytes, else the file at path).

    `kind` names what a row holds ("image", "audio") in the errors, which name the split and the row.
    """
    decoded = []
    for i, value in enumerate(values):
        encoded = value.get("bytes") if isinstance(value, dict) else None
        if encoded is None and isinstance(value, dict) and value.get("path"):
            encoded = Path(value["path"]).read_bytes()
        if encoded is None:
            raise DataError(f"{split} row {i}: column {column!r} holds no {kind}")
        try:
            decoded.append(decode(encoded))
        except Exception as err:  # PIL and soundfile raise many types for broken files
            raise DataError(f"{split} row {i}: the {kind} cannot be decoded ({type(err).__name__})") from None
    return decoded
