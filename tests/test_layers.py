"""The layering of lib/: a sub-package imports only from itself and the rows above it, never a script;
core needs no torch; no module grows past 400 lines."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("core", "geoio", "gaps", "data", "models", "train", "infer", "tune")  # top row first
MAX_LINES = 400


def _modules():
    return sorted(p for p in (REPO / "lib").rglob("*.py"))


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, lazy ones inside functions included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.lineno, node.module)]
            if node.module == "lib":  # `from lib import x` names sub-packages
                found += [(node.lineno, f"lib.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return found


def _package(path: Path) -> str | None:
    parts = path.relative_to(REPO / "lib").parts
    return parts[0] if len(parts) > 1 else None


def test_every_module_sits_in_a_layer():
    loose = [p.name for p in (REPO / "lib").glob("*.py") if p.name != "__init__.py"]
    assert len(loose) <= 10, loose
    packages = {p.name for p in (REPO / "lib").iterdir() if (p / "__init__.py").exists()}
    assert packages == set(LAYERS)


def _violations(path: Path, own: str | None) -> list[str]:
    """Imports of `path` (in sub-package `own`, None for lib/ itself) that break the layering."""
    rank = LAYERS.index(own) if own else len(LAYERS)
    scripts = {p.stem for p in REPO.glob("*.py")}
    wrong = []
    for line, module in _imports(path):
        parts = module.split(".")
        if parts[0] in scripts:
            wrong.append(f"{path}:{line} imports the script {module}")
        if parts[0] != "lib" or len(parts) < 2 or parts[1] == "__version__":
            continue
        if parts[1] not in LAYERS:
            wrong.append(f"{path}:{line}: {module} is not in a sub-package")
        elif own and parts[1] != own and LAYERS.index(parts[1]) > rank:
            wrong.append(f"{path}:{line}: {own} imports {module}, a lower row")
    return wrong


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_imports_go_only_up_the_rows(path):
    assert _violations(path, _package(path)) == []


def test_core_imports_no_torch_at_load():
    """A config error never waits for torch: core imports it only inside the functions that need it."""
    for path in (REPO / "lib" / "core").glob("*.py"):
        top = ast.parse(path.read_text(encoding="utf-8")).body
        names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
        names += [n.module for n in top if isinstance(n, ast.ImportFrom) and n.module]
        assert not [m for m in names if m.split(".")[0] in ("torch", "numpy")], path


def test_the_layer_check_catches_wrong_way_imports(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import predict\nfrom lib import scene\n\n\ndef f():\n    from lib.train.trainer import Trainer\n")
    assert len(_violations(bad, "gaps")) == 3          # a script, a loose module, a lower row (lazily)
    assert _violations(bad, "tune")[1:] == _violations(bad, "gaps")[1:2]   # tune may import train


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_passes_400_lines(path):
    assert len(path.read_text(encoding="utf-8").splitlines()) <= MAX_LINES
