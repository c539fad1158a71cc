"""The distribution ships every package: a non-editable `pip install .` (what a user's wheel
holds) maps each folder with an `__init__.py` through pyproject's `packages` / `package-dir`."""

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+


ROOT = Path(__file__).resolve().parents[2]


def test_every_package_folder_is_in_the_distribution():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = setup["package-dir"]
    shipped = set()
    for name in setup["packages"]:
        top = max((p for p in dirs if name == p or name.startswith(p + ".")), key=len)
        shipped.add(Path(dirs[top], *name[len(top) + 1 :].split(".") if name != top else ()))
    folders = {
        init.parent.relative_to(ROOT)
        for root in set(dirs.values())
        for init in (ROOT / root).rglob("__init__.py")
    }
    assert folders - shipped == set(), "package folders missing from pyproject's `packages`"
    assert shipped - folders == set(), "pyproject names packages that do not exist"
    data = setup["package-data"]["polymodal"]
    assert any((ROOT / "sdk").glob(data[0])), "the shipped model configs"
