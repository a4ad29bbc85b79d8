"""Layering of the project's import packages, checked statically on every source file.

``envs`` and ``policies`` import no other project package, ``export`` imports ``policies``
only, ``compressm_rl`` may import all three. Every ``.py`` file under a package (sub-packages
included) is parsed with ``ast``; module-level and function-level ``import``/``from``
statements count, as do ``importlib.import_module``/``__import__`` calls on a literal name.
Relative imports are resolved against the file's own package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {
    "envs": set(),
    "policies": set(),
    "export": {"policies"},
    "compressm_rl": {"envs", "policies", "export"},
}
# export.runtime, export.bench and the C runtime run on devices with numpy and
# onnxruntime (and a C compiler) only. The subprocess test in test_export.py checks what
# importing them loads; this one also sees imports inside functions, in them and in every
# project module they reach.
DEVICE_MODULES = [
    "export.runtime",
    "export.bench",
    "export.c_build",
    "export.c_bench",
    "export.c_runtime",
    "export.cortex_m4",
    "export.targets",
]
DEVICE_FORBIDDEN = {"torch", "gymnasium", "mujoco", "onnx"}


def module_name(path: Path) -> str:
    """``export/bench.py`` -> ``export.bench``; ``envs/__init__.py`` -> ``envs``."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_files(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


def imported_modules(source: str, filename: str, module: str, is_package: bool = False):
    """``(line, absolute module name or None, statement)`` for each import in ``source``.

    ``module`` is the dotted name of the file (``is_package`` for an ``__init__.py``), used
    to resolve relative imports; None means a relative import beyond the top-level package.
    ``from a.b import c`` yields ``a.b`` and ``a.b.c`` (c may be a module).
    """
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source, filename)):
        text = ast.unparse(node) if isinstance(node, ast.stmt | ast.expr) else ""
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, text
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level > len(package):
                    yield node.lineno, None, text
                    continue
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            yield node.lineno, name, text
            for alias in node.names:
                if alias.name != "*":
                    yield node.lineno, f"{name}.{alias.name}", text
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and not node.args[0].value.startswith(".")
            and (
                (isinstance(node.func, ast.Name) and node.func.id == "__import__")
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
        ):
            yield node.lineno, node.args[0].value, text


def layering_violations(package: str, source: str, filename: str, module: str) -> list[str]:
    """Messages for imports in ``source`` (a file of ``package``) that the layering forbids."""
    forbidden = set(ALLOWED) - ALLOWED[package] - {package}
    is_package = filename.endswith("__init__.py")
    found = []
    for line, name, text in imported_modules(source, filename, module, is_package):
        if name is None:
            found.append(f"{filename}:{line}: `{text}` goes above the top-level package")
        elif name.split(".")[0] in forbidden:
            allowed = ", ".join(sorted(ALLOWED[package])) or "no other project package"
            found.append(
                f"{filename}:{line}: `{text}` imports {name.split('.')[0]}; "
                f"{package} may import {allowed}"
            )
    return sorted(set(found))


def _check_file(path: Path) -> list[str]:
    package = path.relative_to(ROOT).parts[0]
    rel = str(path.relative_to(ROOT))
    return layering_violations(package, path.read_text(), rel, module_name(path))


# ----- the rules --------------------------------------------------------------------------
@pytest.mark.parametrize("package", list(ALLOWED))
def test_packages_import_only_lower_layers(package):
    violations = [v for path in package_files(package) for v in _check_file(path)]
    assert not violations, "forbidden imports:\n" + "\n".join(violations)


def _module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def test_device_modules_import_neither_torch_nor_gym_even_lazily():
    """Every project module that importing a device module can reach, lazy imports included."""
    todo = [(name, "") for name in DEVICE_MODULES]
    seen, violations = set(), {}  # (file, line) -> message
    while todo:
        name, via = todo.pop(0)
        # Importing a.b.c runs a/__init__.py and a/b/__init__.py first.
        parts = name.split(".")
        for n in range(1, len(parts) + 1):
            path = _module_file(".".join(parts[:n]))
            if path is None or path in seen:
                continue
            seen.add(path)
            rel = str(path.relative_to(ROOT))
            is_package = path.name == "__init__.py"
            for line, imported, text in imported_modules(
                path.read_text(), rel, module_name(path), is_package
            ):
                top = imported.split(".")[0] if imported else None
                if top in DEVICE_FORBIDDEN:
                    violations.setdefault(
                        (rel, line),
                        f"{rel}:{line}: `{text}`" + (f" (imported via {via})" if via else ""),
                    )
                elif top in ALLOWED:
                    todo.append((imported, f"{rel}:{line}"))
    assert {ROOT / "export" / "runtime.py", ROOT / "export" / "bench.py"} <= seen
    assert not violations, "device-side modules import:\n" + "\n".join(violations.values())


# ----- the checks above are not vacuous ---------------------------------------------------
MIN_MODULES = {"envs": 3, "policies": 5, "export": 4, "compressm_rl": 6}


def test_checker_sees_the_tree_and_flags_bad_imports():
    for package, minimum in MIN_MODULES.items():
        files = package_files(package)
        assert len(files) >= minimum, f"{package}: only {[str(f) for f in files]}"
        assert ROOT / package / "__init__.py" in files

    # The real tree has cross-package imports, and the walk resolves them.
    edges = set()
    for package in ALLOWED:
        for path in package_files(package):
            is_package = path.name == "__init__.py"
            for _, name, _ in imported_modules(
                path.read_text(), str(path), module_name(path), is_package
            ):
                if name and name.split(".")[0] in ALLOWED:
                    edges.add((package, name.split(".")[0]))
    assert ("export", "policies") in edges and ("compressm_rl", "policies") in edges

    def flagged(package: str, source: str, filename: str | None = None) -> list[str]:
        filename = filename or f"{package}/fake.py"
        return layering_violations(package, source, filename, module_name(ROOT / filename))

    (message,) = flagged("policies", "import numpy\n\nfrom compressm_rl.train import train\n")
    assert message.startswith("policies/fake.py:3: `from compressm_rl.train import train`")
    assert "imports compressm_rl" in message
    (message,) = flagged(
        "policies", "def f():\n    if True:\n        import export.runtime as rt\n"
    )
    assert message.startswith("policies/fake.py:3: `import export.runtime as rt`")
    assert flagged("envs", "from policies import lru")
    assert flagged("export", "from compressm_rl import runs")
    assert flagged("export", "import envs.tasks")
    assert flagged("export", "import importlib\nimportlib.import_module('compressm_rl.train')")
    assert flagged("policies", "from ... import x")  # beyond the top-level package

    # Allowed: own package (absolute and relative, in sub-packages too), lower layers, others.
    assert not flagged("policies", "from policies.lru import LRU\nfrom . import scan\nimport torch")
    assert not flagged("export", "from policies.actor_critic import ActorCritic\nimport onnx")
    assert not flagged("compressm_rl", "from envs import make_env\nfrom export.parity import x")
    assert not flagged("compressm_rl", "from ..runs import load", "compressm_rl/rl/ppo.py")
    assert not flagged("policies", "from .. import lru", "policies/sub/x.py")
    assert not flagged("envs", "import envsx\nimport policies_extra")  # prefixes are not packages
