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
        bad = _imports(path) & {"prefect", "mlflow", "great_expectations", "dvc"}
        bad |= {m for m in _project_imports(path) if m.startswith(("distillery.tasks", "distillery.flows"))}
        assert not bad, f"{path.name} imports {bad}: models/ must stay pure torch/transformers/pandas code"


def _project_imports(path: Path) -> set[str]:
    """Dotted project modules a file imports (``distillery.config``, ``distillery.tasks.gate``, ...)."""
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        top = {n.split(".")[0] for n in names}
        assert not top & {"models", "tasks", "flows"}, f"{path}: import the installed names, distillery.{top}"
        out |= {n for n in names if n.split(".")[0] == "distillery"}
    return out


# The layers, bottom to top: each may import only from layers below it (and from its own).
LAYERS = [
    {"distillery.errors", "distillery.config", "distillery.records", "distillery.faults", "distillery.processes"},
    {"distillery.models"},
    {"distillery.integrations"},
    {"distillery.tasks"},
    {"distillery.flows"},
    {"distillery.commands"},
    {"distillery.cli", "distillery.__main__"},
]


def _layer_of(module: str) -> int:
    for i, layer in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in layer):
            return i
    return -1  # the package markers themselves (``distillery``, ``distillery.integrations`` as a package)


def _module_name(path: Path) -> str:
    """The installed name of a source file: models/gate.py is distillery.models.gate (see pyproject.toml)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[0] in ("models", "tasks", "flows"):
        parts = ("distillery",) + parts
    return ".".join(parts).removesuffix(".__init__")


def test_imports_go_one_way():
    """config/records at the bottom, then models, integrations, tasks, flows, and the CLI at the top."""
    problems = []
    for folder in ("distillery", "distillery/integrations", "distillery/commands", "models", "tasks", "flows"):
        for path in sorted((ROOT / folder).glob("*.py")):
            module = _module_name(path)
            own = _layer_of(module)
            for imported in _project_imports(path):
                theirs = _layer_of(imported)
                if theirs > own:
                    problems.append(f"{module} (layer {own}) imports {imported} (layer {theirs})")
    assert not problems, "\n".join(problems)


def test_cli_calls_flows_only():
    """The CLI runs flows (and the admin functions beside them); it wires no task itself."""
    imported = _project_imports(ROOT / "distillery" / "cli.py")
    assert not any(m.startswith("distillery.tasks") for m in imported), imported


def test_tasks_define_tasks_and_integrations_live_in_one_home():
    """tasks/ included: a task logs through the registry adapter, never MLflow itself."""
    for path in sorted((ROOT / "tasks").glob("*.py")):
        if path.stem != "__init__":
            assert "@task(" in path.read_text(), f"tasks/{path.name} defines no Prefect task"
    # served_model.py is the loader that travels inside every logged model (MLflow models-from-code): it must import
    # mlflow itself and nothing of distillery
    homes = {"mlflow": ("registry.py", "served_model.py"), "great_expectations": ("expectations.py",)}
    for path in sorted(ROOT.glob("*/*.py")) + sorted(ROOT.glob("distillery/*/*.py")):
        if path.parts[-2] in ("tests", "benchmarks", ".venv"):
            continue
        for library, home in homes.items():
            if library in _imports(path) and path.name not in home:
                raise AssertionError(f"{path.relative_to(ROOT)} imports {library}: its home is {home}")


def test_importing_models_loads_no_orchestration_or_tracking():
    code = ("import sys, distillery.models.data, distillery.models.modeling, distillery.models.losses, "
            "distillery.models.training, distillery.models.metrics; "
            "print(sorted(m for m in ('prefect', 'mlflow', 'great_expectations', 'dvc') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_side_effects_at_import(tmp_path):
    """Importing every project module in an empty folder creates no files there (libraries may use $HOME)."""
    home = tmp_path / "home"
    work = tmp_path / "work"
    home.mkdir()
    work.mkdir()
    modules = [_module_name(p)
               for d in ("models", "tasks", "flows", "distillery", "distillery/integrations", "distillery/commands")
               for p in sorted((ROOT / d).glob("*.py")) if p.stem not in ("__init__", "__main__")]
    code = "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]"
    subprocess.run([sys.executable, "-c", code, *modules], cwd=work, check=True,
                   env={"PATH": "/usr/bin:/bin", "HOME": str(home)})
    assert sorted(p.name for p in work.iterdir()) == []


def test_no_remote_code_or_pickle_weights():
    for path in [p for d in ("models", "tasks", "flows", "distillery", "distillery/integrations", "distillery/commands")
                 for p in (ROOT / d).glob("*.py")]:
        text = path.read_text()
        assert "trust_remote_code=True" not in text, path
        assert "from_pretrained(" not in text or "local_files_only=True" in text, path
        assert "weights_only=False" not in text, path


def test_installs_no_top_level_models_tasks_or_flows(tmp_path):
    """The folders stay at the top of the repository; installed, they are distillery.models/.tasks/.flows only."""
    code = ("import importlib.util as u; "
            "print([n for n in ('models', 'tasks', 'flows') if u.find_spec(n)], u.find_spec('distillery.models').origin)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.startswith("[] "), out.stdout
    assert out.stdout.split()[-1] == str(ROOT / "models" / "__init__.py")


def test_served_model_loader_imports_nothing_of_distillery():
    """The file copied into every registered model needs only the model's own requirements."""
    path = ROOT / "distillery" / "integrations" / "served_model.py"
    allowed = {"mlflow", "numpy", "pandas", "torch", "transformers",
               "tokenizers", "fsspec",  # dependencies of transformers (fsspec: the prediction log's writer, when on)
               "onnxruntime"}  # onnxruntime: only for the onnx-int8 form, in its requirements then
    imported = _imports(path) - set(sys.stdlib_module_names)
    assert imported <= allowed, imported - allowed


def test_every_error_a_user_sees_is_a_distillery_error():
    """One base class (with its exit status): the CLI reports any of them in one line without knowing each."""
    import importlib
    import inspect

    from distillery.errors import DistilleryError

    # not the user's errors: an injected test fault, the guard's internal refusal (answered as HTTP), the served
    # loader's (it imports nothing of distillery), and the SIGTERM signal
    exempt = {"InjectedFault", "Refused", "InputError", "Terminated"}
    found = []
    for folder in ("distillery", "distillery/integrations", "distillery/commands", "models", "tasks", "flows"):
        for path in sorted((ROOT / folder).glob("*.py")):
            if path.name == "__main__.py":  # importing it runs the CLI
                continue
            module = importlib.import_module(_module_name(path))
            for name, cls in inspect.getmembers(module, inspect.isclass):
                if cls.__module__ == module.__name__ and issubclass(cls, BaseException) and name not in exempt:
                    found.append(name)
                    assert issubclass(cls, DistilleryError), f"{module.__name__}.{name} is not a DistilleryError"
    assert {"ConfigError", "DataError", "ModelError", "GateError", "TrackingError"} <= set(found), found


def test_the_work_folder_is_named_in_one_place():
    """Every path under the work folder comes from distillery/paths.py: no module spells ``workdir / "..."``, and
    every kind is either collected by gc or kept with a reason."""
    import re

    from distillery.paths import COLLECTED, KEPT, WorkFolder

    spelled = re.compile(r"workdir\s*/\s*[\"'A-Z]")
    for path in sorted(ROOT.glob("*/*.py")) + sorted(ROOT.glob("distillery/*/*.py")):
        if path.parts[-2] in ("tests", ".venv") or path.name == "paths.py":
            continue
        assert not spelled.search(path.read_text()), f"{path.relative_to(ROOT)} names a work folder: use cfg.work"
    assert not set(COLLECTED) & set(KEPT)
    work = WorkFolder(Path("/w"), Path("/cache"))
    assert work.teacher_outputs == Path("/cache") and work.onnx == Path("/w/onnx")
    import pytest

    with pytest.raises(KeyError, match="paths.py"):
        work.kind("new-kind")


def test_functions_fit_on_a_screen():
    """A task is an adapter of about 30 lines (its logic lives in models/ or an integration); no other function
    is over 60. Raise a limit here only with a note in the function that says why."""
    limits = {"tasks": 40, "flows": 60, "models": 60, "distillery": 60}
    long = []
    for folder, limit in limits.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > limit:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} > {limit} lines)")
    assert not long, "\n".join(long)
