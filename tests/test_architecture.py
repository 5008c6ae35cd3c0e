"""The package layout's rules (ARCHITECTURE.md): imports run down the floors, never in a circle; the reader wing never
imports the LoRA wing; small modules; no private names imported across modules."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "orthoreg"
# Below the front doors: none of these may import a front door or an entry point.
LOWER = ("terms", "core", "config.py", "directions", "engine", "reader", "anchor", "audit")
FRONT_AND_ABOVE = ("callback.py", "lora", "firewall", "sft.py", "train.py", "cli.py", "commands", "recipes_lib")
MAX_TOP_LEVEL_MODULES = 12
MAX_MODULE_LINES = 450


def _unit(module: str) -> str:
    """The folder (``reader``) or top-level module (``callback.py``) that a dotted ``orthoreg.…`` name belongs to."""
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    return parts[1] if (PACKAGE / parts[1]).is_dir() else parts[1] + ".py"


def _imports():
    """(file, its unit, imported dotted module, imported names) for every orthoreg import in the package."""
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(relative.parts)
        package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module.removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("orthoreg"):
                        yield path, _unit(module), alias.name, []
                continue
            else:
                continue
            if target.split(".")[0] != "orthoreg":
                continue
            if target == "orthoreg":  # `from .. import x`: x is a folder, a module or a public name
                for name in names:
                    if (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file():
                        yield path, _unit(module), f"orthoreg.{name}", []
                continue
            yield path, _unit(module), target, names


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for _, source, target, _ in _imports():
        unit = _unit(target)
        if unit not in (source, "__init__"):
            graph.setdefault(source, set()).add(unit)
    return graph


def test_no_import_circle_between_folders_and_top_level_modules():
    graph, state, circles = _graph(), {}, []

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                circles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert circles == []


def test_floors():
    graph = _graph()
    assert graph.get("terms", set()) == set(), "terms/ imports nothing of orthoreg"
    assert graph.get("core", set()) == set(), "core/ imports no other orthoreg folder or module"
    assert "lora" not in graph.get("reader", set()), "reader/ never imports lora/ (the layer facts are in core/layers)"
    for lower in LOWER:
        assert not graph.get(lower, set()) & set(FRONT_AND_ABOVE), f"{lower} imports a front door or an entry point"


def test_the_rules_would_catch_a_violation(tmp_path, monkeypatch):
    """The graph sees an import that breaks the rules: a reader module importing the LoRA wing."""
    fake = tmp_path / "orthoreg"
    for folder in ("reader", "lora"):
        (fake / folder).mkdir(parents=True)
        (fake / folder / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "reader" / "penalty.py").write_text("from ..lora.writers import find_residual_writers\n")
    (fake / "lora" / "writers.py").write_text("from ..reader import penalty\n")
    monkeypatch.setitem(globals(), "PACKAGE", fake)
    assert _graph() == {"reader": {"lora"}, "lora": {"reader"}}
    with pytest.raises(AssertionError):
        test_no_import_circle_between_folders_and_top_level_modules()


def test_module_count_and_size():
    top_level = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top_level) <= MAX_TOP_LEVEL_MODULES, top_level
    too_long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
                if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert too_long == {}


def test_no_private_name_imported_across_modules():
    private = [f"{path.relative_to(PACKAGE.parent)}: {target}.{name}" for path, _, target, names in _imports()
               for name in names if name.startswith("_") and not name.startswith("__")]
    assert private == []
