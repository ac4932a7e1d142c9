"""The package is built in floors (docs/ARCHITECTURE.md, "Layers"): a module imports only from its own
floor or the ones below it. Every module's imports, late ones inside functions included, are read here
from the source (ast), so a new upward import fails this test rather than surfacing as an import cycle."""

import ast
from pathlib import Path

import pytest

import patchdiff

ROOT = Path(patchdiff.__file__).parent

# Low -> high; a name is a top-level module or subpackage of patchdiff.
LAYERS = (
    ("ground", {"config", "config_flags", "files", "snapshot", "presets", "distributed"}),
    (
        "math",
        {
            "precond",
            "precond_vp",
            "loss",
            "loss_weighting",
            "sampling",
            "patching",
            "augment",
            "canvas",
            "inpaint",
            "latent",
            "networks",
            "denoisers",
            "flops",
        },
    ),
    ("sampling front end", {"generation"}),
    ("data and metrics", {"data", "metrics"}),
    ("training", {"training"}),
    ("tools", {"compare", "report", "interop", "demo"}),
    ("command line", {"cli", "__main__"}),
)
FLOOR = {name: i for i, (_, names) in enumerate(LAYERS) for name in names}


def modules() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if p.relative_to(ROOT).parts[0] != "__init__.py")


def unit(path: Path) -> str:
    """The top-level module or subpackage a file belongs to."""
    return path.relative_to(ROOT).with_suffix("").parts[0]


def imported_units(path: Path, source: str | None = None) -> list[tuple[str, int]]:
    """(unit, line) of every patchdiff import in a file, absolute or relative."""
    package = path.relative_to(ROOT).parent.parts
    found = []
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = list(package[: len(package) - node.level + 1])
                module = ".".join(["patchdiff", *base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            names = [f"{module}.{a.name}" for a in node.names] if module == "patchdiff" else [module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "patchdiff" and len(parts) > 1:
                found.append((parts[1], node.lineno))
    return found


def test_every_module_has_a_floor():
    units = {unit(p) for p in modules()}
    assert units - set(FLOOR) == set(), "add the new module to LAYERS here and in docs/ARCHITECTURE.md"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_from_a_higher_floor(path):
    mine = FLOOR[unit(path)]
    upward = [
        f"line {line}: patchdiff.{name} ({LAYERS[FLOOR[name]][0]})"
        for name, line in imported_units(path)
        if name in FLOOR and FLOOR[name] > mine
    ]
    assert not upward, f"{path.relative_to(ROOT)} ({LAYERS[mine][0]}) imports upward: {upward}"


def test_the_check_sees_late_and_relative_imports():
    """The parser itself: an import inside a function and a relative one are both found."""
    probe = ROOT / "networks" / "_probe.py"  # path arithmetic only: never written
    source = "def f():\n    from ..training import loop\n    import patchdiff.cli\n"
    assert sorted(imported_units(probe, source)) == [("cli", 3), ("training", 2)]
