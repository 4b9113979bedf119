"""Command line: `python train.py recipe=NAME [key=value ...]` (also under `accelerate launch`), and the
installed `dmssl` command: `dmssl train|predict|export|plot ...` from any folder.

User mistakes (dmssl.errors.UserError) print one line and exit with code 2 (3 for a diverged loss);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
import warnings

from dmssl.errors import UserError

USAGE = """usage: python train.py recipe=NAME [section.key=value ...]
       accelerate launch train.py recipe=NAME [section.key=value ...]

  recipe=NAME        a recipe in recipes/ ({recipes}) or a path to a YAML file
  section.key=value  override any config key, e.g. trainer.max_steps=500 distance.name=wasserstein
  output_dir=DIR     where the run is written (default runs/<recipe>-<time>)
  resume=auto        continue the newest checkpoint in output_dir
Every key: docs/config-reference.md"""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in args):
        from dmssl.recipe import recipe_names

        print(USAGE.format(recipes=", ".join(recipe_names())))
        return 0
    try:
        from dmssl.recipe import resolve
        from dmssl.trainer import fit

        cfg = resolve(args)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pin_memory.*")
            fit(cfg)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Everything is written and the process group is gone. Freeing DDP's reducer at interpreter
            # exit can deadlock (its gloo group joins a worker thread that waits for the GIL), so a
            # process of a multi-process run leaves without running destructors.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


COMMANDS = {
    "train": "train a model: dmssl train recipe=NAME [key=value ...]",
    "predict": "classify files with a trained model: dmssl predict RUN_DIR INPUT... [--output F]",
    "export": "write a self-describing model folder: dmssl export RUN_DIR OUT_DIR",
    "plot": "figures of finished runs (and their confusion matrix): dmssl plot RUN_DIR ...",
}


def console(argv: list[str] | None = None) -> int:
    """The `dmssl` command (an entry point of the installed package; `python -m dmssl` is the same)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print("usage: dmssl COMMAND ...\n\n" + "\n".join(f"  {name:8} {text}" for name, text in COMMANDS.items()))
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "train":
        return main(rest)
    if command == "predict":
        from dmssl.predict import main as predict

        return predict(rest)
    if command == "export":
        from dmssl.export import main as export

        return export(rest)
    if command == "plot":
        from dmssl.plot import main as plot

        return plot(rest)
    import difflib

    near = difflib.get_close_matches(command, COMMANDS, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    print(f"error: unknown command {command!r}{hint} Allowed: {', '.join(COMMANDS)}", file=sys.stderr)
    return 2
