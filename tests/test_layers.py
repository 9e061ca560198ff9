"""Packaging and layering: everything installs under ``vlm``; imports go one way (core <- recipes/eval <- CLI).

The walk reads every module of the installed ``vlm`` package (the core, plus ``vlm.train``, ``vlm.eval``
and ``vlm.data_recipes``, which the repository keeps in top-level folders) with ``ast``, including imports
inside functions, and fails on an import of a higher layer or of a bare ``train`` / ``eval`` /
``data_recipes`` package.
"""
from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

RECIPES = ("vlm.train", "vlm.eval", "vlm.data_recipes")
APP = ("vlm.cli", "vlm.__main__")
LAYER_NAMES = {0: "core", 1: "recipes/evaluation", 2: "CLI/demo"}


def layer(module: str) -> int | None:
    """0 core, 1 recipes and evaluation, 2 CLI and demo; None for modules outside vlm."""
    if module != "vlm" and not module.startswith("vlm."):
        return None
    if any(module == a or module.startswith(a + ".") for a in APP):
        return 2
    if any(module == r or module.startswith(r + ".") for r in RECIPES):
        return 1
    return 0


def package_modules() -> dict[str, Path]:
    """module name -> source file, for every module of the installed vlm package."""
    out = {}
    for pkg in ("vlm",) + RECIPES:
        spec = importlib.util.find_spec(pkg)
        root = Path(spec.origin).parent
        for f in root.rglob("*.py"):
            rel = f.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if pkg == "vlm" and any(name == r or name.startswith(r + ".") for r in RECIPES):
                continue
            out[name] = f
    return out


def imports_of(module: str, path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    pkg = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((name, node.lineno))
    return found


def test_the_walk_sees_every_layer():
    mods = package_modules()
    assert {"vlm.registry", "vlm.train.pretrain", "vlm.eval.zeroshot", "vlm.data_recipes.build",
            "vlm.cli", "vlm.cli.demo"} <= set(mods)
    assert {layer(m) for m in mods} == {0, 1, 2}


def test_imports_go_one_way():
    bad = []
    for mod, path in sorted(package_modules().items()):
        own = layer(mod)
        for name, line in imports_of(mod, path):
            top = name.split(".")[0]
            if top in ("train", "eval", "data_recipes"):
                bad.append(f"{path}:{line}: {mod} imports the bare top-level package {name!r}; use vlm.{name}")
                continue
            other = layer(name)
            if other is not None and other > own:
                bad.append(f"{path}:{line}: {mod} ({LAYER_NAMES[own]}) imports {name} ({LAYER_NAMES[other]})")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_layer_check_catches_a_wrong_arrow(tmp_path):
    """The check itself: a core module importing a recipe is reported."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from vlm.train.common import OptimConfig\n")
    (name, _), = imports_of("vlm.model", f)
    assert layer(name) == 1 > layer("vlm.model")


def test_nothing_generic_is_installed_top_level():
    for bare in ("train", "eval", "data_recipes"):
        spec = importlib.util.find_spec(bare)
        assert spec is None or "site-packages" not in str(spec.origin or ""), f"{bare} is installed top-level"


def test_user_train_py_and_eval_package_do_not_shadow_vlm(tmp_path):
    """A user's own train.py and eval/ in the working directory change nothing about ``python -m vlm``."""
    (tmp_path / "train.py").write_text("raise SystemExit('the user train.py was imported')\n")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "__init__.py").write_text("raise SystemExit('the user eval package was imported')\n")
    (tmp_path / "data_recipes.py").write_text("raise SystemExit('the user data_recipes was imported')\n")
    for args in (["--help"], ["train", "--list"], ["eval", "--help"], ["shards", "--help"]):
        r = subprocess.run([sys.executable, "-m", "vlm", *args], cwd=tmp_path, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, (args, r.stderr)
        assert "was imported" not in r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "vlm", "train", "--list"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert "pretrain_demo" in r.stdout


def test_a_command_whose_import_fails_is_an_error(monkeypatch, capsys):
    import vlm.cli as cli

    monkeypatch.setitem(cli.COMMANDS, "broken", ("vlm.no_such_module_xyz", "a broken command"))
    assert cli.main(["--help"]) == 2
    err = capsys.readouterr().err
    assert "vlm.no_such_module_xyz" in err and "'broken'" in err and "Traceback" not in err


@pytest.mark.parametrize("name", ["pretrain_demo", "pretrain_demo.yaml", "train/configs/finetune_demo.yaml"])
def test_shipped_config_by_name(name, tmp_path, monkeypatch):
    from vlm.train.cli import CONFIG_DIR, resolve_config_path

    monkeypatch.chdir(tmp_path)
    p = Path(resolve_config_path(name))
    assert p.parent == CONFIG_DIR and p.is_file()


def test_config_path_that_is_a_directory_says_so(tmp_path):
    from vlm.config import ConfigError
    from vlm.train.cli import resolve_config_path

    with pytest.raises(ConfigError, match="is a directory"):
        resolve_config_path(str(tmp_path))
    with pytest.raises(ConfigError, match="shipped config name: .*pretrain_demo"):
        resolve_config_path(str(tmp_path / "nope.yaml"))


def test_babel_imagenet_files_ship_with_the_package():
    from vlm.eval.babel import BUNDLED_LABELS, BUNDLED_PROMPTS, load_labels, load_prompts

    assert len(load_labels(BUNDLED_LABELS).languages) == 93
    assert len(load_prompts(BUNDLED_PROMPTS).templates) == 90


def test_pyproject_lists_every_package():
    """The wheel installs the packages pyproject.toml lists: a new sub-package must be listed there."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    dirs = {"vlm": root / "vlm", "vlm.train": root / "train", "vlm.eval": root / "eval",
            "vlm.data_recipes": root / "data_recipes"}
    found = set()
    for pkg, d in dirs.items():
        for init in d.rglob("__init__.py"):
            rel = init.parent.relative_to(d).parts
            found.add(".".join([pkg, *rel]))
    assert found == listed, f"not listed: {sorted(found - listed)}; listed but absent: {sorted(listed - found)}"
