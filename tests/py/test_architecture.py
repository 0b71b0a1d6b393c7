"""The shape of runtime/ledgerq: no import circle anywhere, and every module in a layer.

``scripts/check`` runs the import-linter contracts of ``.importlinter``; they
hold the layers, but only for the modules they name, and a module importing
its own package's ``__init__`` (as ``cli/operators.py`` once imported ``main``
from ``cli/__init__.py``) breaks no layer. These tests close both gaps: a
module nobody placed in a layer, or a circle of imports of any length, fails.
"""

from __future__ import annotations

import configparser
import functools
from pathlib import Path

import grimp

import ledgerq

CONFIG = Path(__file__).resolve().parents[2] / ".importlinter"


@functools.cache
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("ledgerq", include_external_packages=False, cache_dir=None)


def contracts() -> dict[str, dict[str, str]]:
    parser = configparser.ConfigParser()
    parser.read(CONFIG)
    return {
        section.removeprefix("importlinter:contract:"): dict(parser[section])
        for section in parser.sections()
        if section.startswith("importlinter:contract:")
    }


def layer_modules(contract: dict[str, str]) -> set[str]:
    """Every module a layers contract names, with its container prefixed."""
    names = {
        name.strip()
        for line in contract["layers"].splitlines()
        for name in line.replace(":", "|").split("|")
        if name.strip()
    }
    containers = contract.get("containers", "").split()
    if not containers:
        return names
    return {f"{container}.{name}" for container in containers for name in names}


def test_the_modules_found_are_the_package() -> None:
    on_disk = {
        ".".join(
            ("ledgerq", *p.relative_to(Path(ledgerq.__file__).parent).with_suffix("").parts)
        ).removesuffix(".__init__")
        for p in Path(ledgerq.__file__).parent.rglob("*.py")
    }
    assert graph().modules == on_disk


def test_every_module_is_in_a_layer_of_the_dependency_contract() -> None:
    layers = layer_modules(contracts()["layers"])
    outside = sorted(
        module
        for module in graph().modules - {"ledgerq"}
        if not any(module == layer or module.startswith(f"{layer}.") for layer in layers)
    )
    assert outside == []


def test_every_module_of_a_layered_package_is_in_one_of_its_layers() -> None:
    for name, contract in contracts().items():
        if contract["type"] != "layers" or "containers" not in contract:
            continue
        layers = layer_modules(contract)
        for container in contract["containers"].split():
            children = graph().find_children(container)
            assert children <= layers, (name, sorted(children - layers))


def test_no_import_circle_anywhere_in_the_package() -> None:
    g = graph()
    circles = set()
    for importer in g.modules:
        for imported in g.find_modules_directly_imported_by(importer):
            back = g.find_shortest_chain(importer=imported, imported=importer)
            if back is not None:
                circles.add(" -> ".join((importer, *back)))
    assert sorted(circles) == []
