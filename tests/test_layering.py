"""The layering rules of STYLE.md, checked on the source."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_models_is_pure_code():
    for path in sorted((ROOT / "models").glob("*.py")):
        bad = _imports(path) & {"prefect", "mlflow", "great_expectations", "dvc", "tasks", "flows"}
        assert not bad, f"{path.name} imports {bad}: models/ must stay pure torch/transformers/pandas code"


def test_imports_go_one_way():
    for path in sorted((ROOT / "tasks").glob("*.py")):
        assert "flows" not in _imports(path), f"tasks/{path.name} imports flows"


def test_importing_models_loads_no_orchestration_or_tracking():
    code = ("import sys, models.data, models.modeling, models.losses, models.training, models.metrics; "
            "print(sorted(m for m in ('prefect', 'mlflow', 'great_expectations', 'dvc') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_side_effects_at_import(tmp_path):
    """Importing every project module in an empty folder creates no files there (libraries may use $HOME)."""
    home = tmp_path / "home"
    work = tmp_path / "work"
    home.mkdir()
    work.mkdir()
    modules = [f"{p.parent.name}.{p.stem}" for d in ("models", "tasks", "flows", "distillery")
               for p in sorted((ROOT / d).glob("*.py")) if p.stem != "__init__"]
    code = "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]"
    subprocess.run([sys.executable, "-c", code, *modules], cwd=work, check=True,
                   env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(home)})
    assert sorted(p.name for p in work.iterdir()) == []


def test_no_remote_code_or_pickle_weights():
    for path in list((ROOT / "models").glob("*.py")) + list((ROOT / "tasks").glob("*.py")):
        text = path.read_text()
        assert "trust_remote_code=True" not in text, path
        assert "from_pretrained(" not in text or "local_files_only=True" in text, path
