"""Classify new files with a trained model: `python -m dmssl.predict RUN_DIR INPUT... [--output preds.csv]`.

INPUT is whatever the run's adapter reads: image files, text files (.txt: one text per line; .jsonl, .csv,
.parquet: the `modality.text_column` of each row), audio files, or folders of them (searched recursively
for the adapter's file types). RUN_DIR is a run folder or an export. Each sample gives one row:

    input, prediction, probability, top_k    (top_k: "class:probability" pairs, best first)

to `--output` (.csv or .jsonl) or, without it, as CSV on stdout. A text file of several lines names its
rows `file:LINE`. Bad input (an unreadable file, a folder with nothing to read, a run without a
checkpoint, an `--output` that is one of the inputs or cannot be written) stops with exit code 2 and one
line that says what is wrong, before any compute where it can be known then.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from dmssl.classifier import Classifier, load
from dmssl.errors import DataError, UserError
from dmssl.files import temporary_file


def read_inputs(classifier: Classifier, inputs: list[str]) -> tuple[list[str], list[Any]]:
    """(names, samples) of every input file, in the order given (folders: sorted, recursively)."""
    names: list[str] = []
    samples: list[Any] = []
    suffixes = classifier.adapter.input_suffixes
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and has_suffix(p, suffixes))
            if not files:
                allowed = ", ".join(suffixes) or "none"
                raise DataError(f"{path} holds no file this {classifier.config.modality.name} model reads "
                                f"(file types: {allowed})")
        elif path.is_file():
            files = [path]
        else:
            raise DataError(f"{path} does not exist")
        for file in files:
            if file.stat().st_size == 0:
                raise DataError(f"{file} is empty")
            found = classifier.adapter.read_inputs(file)
            if not found:
                raise DataError(f"{file} holds no sample")
            samples += found
            names += [str(file)] if len(found) == 1 else [f"{file}:{i + 1}" for i in range(len(found))]
    return names, samples


def has_suffix(path: Path, suffixes: tuple[str, ...]) -> bool:
    """`x.jsonl.gz` counts as .jsonl."""
    parts = [s.lower() for s in path.suffixes]
    if parts[-1:] == [".gz"]:
        parts = parts[:-1]
    return bool(parts) and parts[-1] in suffixes


def prediction_rows(names: list[str], probabilities: np.ndarray, class_names: list[str], top_k: int) -> list[dict]:
    rows = []
    for name, p in zip(names, probabilities, strict=True):
        order = np.argsort(-p, kind="stable")[:top_k]
        rows.append({"input": name, "prediction": class_names[order[0]], "probability": round(float(p[order[0]]), 6),
                     "top_k": [[class_names[k], round(float(p[k]), 6)] for k in order]})
    return rows


def check_output(output: Path, inputs: list[str], suffixes: tuple[str, ...] | None = None) -> None:
    """Before any compute: `--output` is a .csv/.jsonl file in a writable folder and is not one of the inputs
    (nor, given the model's file types, a file an input folder would be read for)."""
    if output.suffix.lower() not in (".csv", ".jsonl"):
        raise DataError(f"--output={output}: the file type must be .csv or .jsonl")
    if output.is_dir():
        raise DataError(f"--output={output} is a folder; give a .csv or .jsonl file")
    target = output.resolve()
    for text in inputs:
        source = Path(text).resolve()
        if source == target:
            raise DataError(f"--output={output} is one of the inputs; writing it would overwrite them: give another file")
        if suffixes is not None and source.is_dir() and source in target.parents and has_suffix(target, suffixes):
            raise DataError(f"--output={output} is inside the input folder {text} and is a file type this model reads; "
                            "give a file outside it")
    folder = target.parent
    if not folder.is_dir():
        raise DataError(f"--output={output}: the folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DataError(f"--output={output}: the folder {str(folder)!r} is read-only for this user")


def write_rows(rows: list[dict], output: Path | None) -> None:
    if output is not None and output.suffix.lower() == ".jsonl":
        write_text_atomic(output, "".join(json.dumps(r) + "\n" for r in rows))
        return
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["input", "prediction", "probability", "top_k"])
    for r in rows:
        writer.writerow([r["input"], r["prediction"], r["probability"], ";".join(f"{c}:{p}" for c, p in r["top_k"])])
    if output is None:
        sys.stdout.write(buffer.getvalue())
    else:
        write_text_atomic(output, buffer.getvalue())


def write_text_atomic(path: Path, text: str) -> None:
    """The whole file or none of it (a full disk or a kill leaves the previous file, if any)."""
    fd, tmp_name = temporary_file(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp_name, path)
    except OSError as err:
        Path(tmp_name).unlink(missing_ok=True)
        raise DataError(f"--output={path} cannot be written ({err.strerror or err})") from None
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dmssl predict", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run folder or an export (dmssl export)")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="files or folders in the adapter's native forms")
    parser.add_argument("--output", type=Path, help="write rows to this .csv or .jsonl file (default: CSV on stdout)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=3, help="classes listed per sample (default 3)")
    parser.add_argument("--trust-plugins", action="store_true",
                        help="let RUN_DIR's config import the modules it names (plugins, a module:Class adapter)")
    args = parser.parse_args(argv)
    try:
        if args.batch_size < 1 or args.top_k < 1:
            raise DataError(f"--batch-size={args.batch_size} and --top-k={args.top_k} must be >= 1")
        if args.output is not None:
            check_output(args.output, args.inputs)
        classifier = load(args.run_dir, batch_size=args.batch_size, trust_plugins=args.trust_plugins)
        if args.output is not None:
            check_output(args.output, args.inputs, classifier.adapter.input_suffixes)
        names, samples = read_inputs(classifier, args.inputs)
        probabilities = classifier.proba_of_samples(samples)
        write_rows(prediction_rows(names, probabilities, classifier.class_names, min(args.top_k, classifier.num_classes)),
                   args.output)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    if args.output is not None:
        print(f"{len(names)} predictions -> {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
