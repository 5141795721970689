"""DESIGN.md's import boundaries, enforced two ways.

1. Import a module in a fresh interpreter and look at ``sys.modules``: what it really loads.
2. Scan every import statement of a package's source (AST): what it may load on any code path,
   including imports inside functions.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("ray", "torch", "diffusers", "transformers", "peft", "accelerate")
WEB = ("fastapi", "starlette", "uvicorn", "sse_starlette")


def loaded_by(modules: str | list[str], candidates: tuple[str, ...]) -> list[str]:
    """Which of ``candidates`` a fresh interpreter has loaded after importing ``modules``."""
    names = [modules] if isinstance(modules, str) else modules
    code = ("import json, sys\n" + "".join(f"import {m}\n" for m in names) +
            f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(candidates)!r}))))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_api_loads_no_compute_stack() -> None:
    assert loaded_by("api", HEAVY + WEB) == []
    assert loaded_by(["api.http.app", "api.runner.runner"], HEAVY) == []
    assert loaded_by(["api.runner.runner", "api.services.jobs", "api.services.settlement",
                      "api.services.maintenance", "api.services.loras", "api.services.inputs"], HEAVY + WEB) == []


def _modules(package: str) -> list[str]:
    return sorted(".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / package).rglob("*.py")
                  if p.name != "__init__.py")


def test_api_core_loads_no_web_framework_nor_compute() -> None:
    modules = _modules("api/core")
    assert "api.core.ledger" in modules and "api.core.jobs" in modules
    assert loaded_by(modules, HEAVY + WEB) == []


def test_the_check_itself_sees_a_heavy_import() -> None:
    # so that an empty answer above means "not loaded", not "not looked at"
    assert loaded_by("fastapi", WEB) == ["fastapi", "starlette"]


_SCAN = """
import ast, json, sys

def imports(path):
    names = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), filename=path)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif (isinstance(node, ast.Call)
              and getattr(node.func, "id", getattr(node.func, "attr", None)) in ("import_module", "__import__")
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value.split(".")[0])
    return sorted(names)

print(json.dumps({path: imports(path) for path in json.load(sys.stdin)}))
"""


def imports_by_file(paths: list[Path]) -> dict[Path, set[str]]:
    """Top-level names of every module each file imports (absolute imports; relative ones are local).

    The files are parsed in a fresh interpreter: in a long test run, CPython 3.11's AST validator can
    find its process-wide recursion count left off by earlier code ("SystemError: AST constructor
    recursion depth mismatch"), whichever thread parses."""
    result = subprocess.run([sys.executable, "-c", _SCAN], input=json.dumps([str(p) for p in paths]),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads(result.stdout)
    return {path: set(found[str(path)]) for path in paths}


def imports_of(path: Path) -> set[str]:
    return imports_by_file([path])[path]


def violations(package: str, forbidden: set[str]) -> list[str]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no sources under {package}"
    return [f"{path.relative_to(ROOT)} imports {sorted(bad)}"
            for path, names in imports_by_file(files).items() if (bad := names & forbidden)]


@pytest.mark.parametrize(("package", "forbidden"), [
    ("models", {"api", "serve"}),
    ("training", {"api", "serve"}),
    ("api", {"serve", "ray", "torch", "diffusers", "transformers", "peft"}),
    ("api/core", {"fastapi", "starlette", "sse_starlette", "uvicorn", "ray", "torch", "serve"}),
])
def test_static_import_boundaries(package: str, forbidden: set[str]) -> None:
    assert violations(package, forbidden) == []


def test_the_scan_sees_function_level_and_dynamic_imports(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("import os\n"
                      "def f():\n    from serve.executor import RayExecutor\n    import ray.serve\n"
                      "def g():\n    import importlib\n    importlib.import_module('torch.nn')\n"
                      "from . import sibling\n")
    assert imports_of(source) == {"os", "serve", "ray", "importlib", "torch"}
