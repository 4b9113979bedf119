"""Export a trained run as a self-describing folder: `python -m dmssl.export RUN_DIR OUT_DIR`.

    OUT_DIR/model.safetensors   the EMA model's weights (encoder, projection head, prototypes, classifier)
    OUT_DIR/config.yaml         the run's resolved config
    OUT_DIR/model.json          class names, the adapter's inference state, where the export came from
    OUT_DIR/README.md           a model card: data, objective, measured accuracy, how to load it
    OUT_DIR/encoder/            where the adapter has one: the encoder in its own ecosystem's format
                                (text: `transformers.AutoModel.from_pretrained(OUT_DIR/encoder)`)

`dmssl.load(OUT_DIR)` reads it back. The folder is written beside OUT_DIR first and renamed at the end,
so a failed export leaves no half-written folder behind. `--overwrite` replaces OUT_DIR only where it is
an earlier export (never a run folder, a folder that holds the run or the working folder, or anything else).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from dmssl.classifier import (
    ENCODER_FOLDER,
    MODEL_FILE,
    WEIGHTS_FILE,
    Classifier,
    load,
    read_json_file,
    write_model_description,
)
from dmssl.config import config_to_dict
from dmssl.errors import CheckpointError, UserError
from dmssl.files import process_alive, temporary_folder
from dmssl.trust import TrustPlugins

EXPORT_FILES = {WEIGHTS_FILE, MODEL_FILE, "config.yaml", "README.md", ENCODER_FOLDER}


def is_export(folder: Path) -> bool:
    """Whether `folder` is a dmssl export and nothing else: its weights, model.json and config.yaml, no
    checkpoints, and no file an export does not write (which replacing it would delete)."""
    if not folder.is_dir() or folder.is_symlink():
        return False
    names = {p.name for p in folder.iterdir()}
    return {WEIGHTS_FILE, MODEL_FILE, "config.yaml"} <= names and names <= EXPORT_FILES


def check_export_target(run_dir: Path, out_dir: Path, overwrite: bool) -> None:
    """Refuse an `out_dir` whose replacement could delete anything but an earlier export."""
    target, source, here = out_dir.resolve(), run_dir.resolve(), Path.cwd().resolve()
    if target == source:
        raise CheckpointError("the export folder must differ from the run folder")
    if target == here or target in here.parents:
        raise CheckpointError(f"{str(out_dir)!r} is the working folder or holds it; export to a new folder inside it")
    if target in source.parents:
        raise CheckpointError(f"{str(out_dir)!r} holds the run folder {str(run_dir)!r}; export to a folder beside it")
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise CheckpointError(f"{str(out_dir)!r} exists and is not a folder; give a new folder")
    if not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise CheckpointError(f"{str(out_dir)!r} exists and is not empty; pass --overwrite (it replaces an earlier "
                              "export only) or another folder")
    if not is_export(out_dir):
        raise CheckpointError(f"{str(out_dir)!r} is not a dmssl export (an export holds only "
                              f"{', '.join(sorted(EXPORT_FILES))}); --overwrite replaces an earlier export and nothing "
                              "else: give a new folder")


def export(run_dir: str | Path, out_dir: str | Path, overwrite: bool = False,
           trust_plugins: TrustPlugins = False) -> Path:
    """Write the export of `run_dir` (a run folder or an earlier export) to `out_dir`; returns `out_dir`.

    `overwrite` replaces `out_dir` only if it is itself an export (`is_export`): the old one is renamed aside,
    the new one moved in, then the old one deleted, so a kill at any point leaves one whole export."""
    from safetensors.torch import save_file

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    recover_set_aside(out_dir)
    check_export_target(run_dir, out_dir, overwrite)
    classifier = load(run_dir, device="cpu", trust_plugins=trust_plugins)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = temporary_folder(out_dir)
    except OSError as err:
        raise CheckpointError(f"cannot write beside {str(out_dir)!r} ({err.strerror or err})") from None
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
        replace_folder(staging, out_dir)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointError(f"cannot write the export {str(out_dir)!r} ({err.strerror or err})") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def replace_folder(new: Path, target: Path) -> None:
    """Move the folder `new` to `target`, replacing an existing (checked) one without a moment of neither:
    the old one is first renamed aside (`.<name>.<pid>.old`), and deleted only once the new one is in."""
    if target.is_dir() and any(target.iterdir()):
        aside = target.with_name(f".{target.name}.{os.getpid()}.old")
        os.replace(target, aside)
        try:
            os.replace(new, target)
        except BaseException:
            os.replace(aside, target)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    else:
        if target.is_dir():
            target.rmdir()  # empty
        os.replace(new, target)


def recover_set_aside(target: Path) -> None:
    """An export killed between its two renames left the old export aside: put it back where it was (when
    nothing took its place) or delete it (when the new one made it in)."""
    for aside in target.parent.glob(f".{target.name}.*.old"):
        pid = aside.name[len(target.name) + 2: -len(".old")]
        if not pid.isdigit() or process_alive(int(pid)):
            continue
        if target.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(aside, target)


def read_summary(run_dir: Path) -> dict[str, Any]:
    """The run's summary.json, or an export's model.json figures; {} when neither says."""
    for name in ("summary.json", MODEL_FILE):
        path = run_dir / name
        if path.is_file():
            found = read_json_file(path)
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
        "## Load it", "", "```python", "import dmssl", "", 'clf = dmssl.load("path/to/this/folder")  # from outside it',
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
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it is an earlier export")
    parser.add_argument("--trust-plugins", action="store_true",
                        help="let RUN_DIR's config import the modules it names (plugins, a module:Class adapter)")
    args = parser.parse_args(argv)
    try:
        out = export(args.run_dir, args.out_dir, args.overwrite, args.trust_plugins)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print(f"exported {args.run_dir} to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
