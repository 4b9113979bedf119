"""Export a trained run as a self-describing folder: `python -m dmssl.export RUN_DIR OUT_DIR`.

    OUT_DIR/model.safetensors   the EMA model's weights (encoder, projection head, prototypes, classifier)
    OUT_DIR/config.yaml         the run's resolved config
    OUT_DIR/model.json          class names, the adapter's inference state, where the export came from
    OUT_DIR/README.md           a model card: data, objective, measured accuracy, how to load it
    OUT_DIR/encoder/            where the adapter has one: the encoder in its own ecosystem's format
                                (text: `transformers.AutoModel.from_pretrained(OUT_DIR/encoder)`)

`dmssl.load(OUT_DIR)` reads it back. The folder is written beside OUT_DIR first and renamed at the end,
so a failed export leaves no half-written folder behind.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from dmssl.classifier import ENCODER_FOLDER, MODEL_FILE, WEIGHTS_FILE, Classifier, load, write_model_description
from dmssl.config import config_to_dict
from dmssl.errors import CheckpointError, UserError


def export(run_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write the export of `run_dir` (a run folder or an earlier export) to `out_dir`; returns `out_dir`."""
    from safetensors.torch import save_file

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise CheckpointError(f"{str(out_dir)!r} exists and is not empty; pass --overwrite or another folder")
    if out_dir.resolve() == run_dir.resolve():
        raise CheckpointError("the export folder must differ from the run folder")
    classifier = load(run_dir, device="cpu")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        # safetensors stores plain contiguous tensors (channels-last weights are strided)
        weights = {k: v.detach().contiguous().cpu() for k, v in classifier.model.state_dict().items()}
        save_file(weights, staging / WEIGHTS_FILE, metadata={"format": "pt", "dmssl": "SSLModel"})
        (staging / "config.yaml").write_text(yaml.safe_dump(config_to_dict(classifier.config), sort_keys=False),
                                             encoding="utf-8")
        has_encoder = classifier.adapter.export_encoder(classifier.model.encoder, staging / ENCODER_FOLDER)
        summary = read_summary(run_dir)
        write_model_description(staging, classifier.class_names, classifier.adapter, source=classifier.source,
                                encoder_folder=ENCODER_FOLDER if has_encoder else None,
                                test_accuracy=summary.get("test_accuracy"), test_macro_f1=summary.get("test_macro_f1"))
        (staging / "README.md").write_text(model_card(classifier, summary, has_encoder), encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def read_summary(run_dir: Path) -> dict[str, Any]:
    """The run's summary.json, or an export's model.json figures; {} when neither says."""
    for name in ("summary.json", MODEL_FILE):
        path = run_dir / name
        if path.is_file():
            found = json.loads(path.read_text(encoding="utf-8"))
            if "test_accuracy" in found:
                return found
    return {}


def model_card(classifier: Classifier, summary: dict[str, Any], has_encoder: bool) -> str:
    cfg = classifier.config

    def figure(key: str) -> str:
        value = summary.get(key)
        return f"{value:.4f}" if isinstance(value, (int, float)) else "not recorded"

    labels = cfg.data.num_labels or (f"{cfg.data.labels_per_class} per class" if cfg.data.labels_per_class else "all")
    lines = [
        f"# dmssl model: {cfg.recipe}", "",
        f"A classifier of {cfg.modality.name} data, trained with dmssl (objective `{cfg.objective.name}`"
        + (f", distance `{cfg.distance.name}`" if summary.get("distance") else "") + ").", "",
        "| | |", "|---|---|",
        f"| data | `{cfg.data.dataset}`, labels: {labels}, seed {cfg.seed} |",
        f"| encoder | `{cfg.model.encoder}` |",
        f"| classes | {', '.join(classifier.class_names)} |",
        f"| trained | {summary.get('steps', '?')} steps, from {classifier.source} |",
        f"| test accuracy | {figure('test_accuracy')} on {summary.get('num_test_evaluated', '?')} test samples |",
        f"| test macro-F1 | {figure('test_macro_f1')} |",
        "", "Measured by the run itself on its test split (EMA weights, the weights saved here).", "",
        "## Load it", "", "```python", "import dmssl", "", f'clf = dmssl.load("{Path(".")}")  # this folder',
        "clf.predict(samples)        # class indices; clf.class_names names them",
        "clf.predict_proba(samples)  # probabilities", "clf.embed(samples)          # embeddings", "```", "",
        "or from the command line: `dmssl predict THIS_FOLDER INPUT...`.",
    ]
    if has_encoder:
        lines += ["", f"`{ENCODER_FOLDER}/` holds the fine-tuned encoder in its own format, e.g. "
                  f"`transformers.AutoModel.from_pretrained(\"{ENCODER_FOLDER}\")` for a text model."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dmssl export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run folder (or an export) to read")
    parser.add_argument("out_dir", help="the folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it is not empty")
    args = parser.parse_args(argv)
    try:
        out = export(args.run_dir, args.out_dir, args.overwrite)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print(f"exported {args.run_dir} to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
