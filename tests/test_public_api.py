"""packrunner's public surface: each package's ``__all__`` is exactly what it exports."""

from __future__ import annotations
import __future__

import importlib
import pkgutil
from types import ModuleType

import pytest

import packrunner

#: Public modules and subpackages (documented in docs/architecture.md); any other module must
#: be private (leading underscore).
PUBLIC_MODULES = {
    "bench",
    "cli",
    "compat",
    "config",
    "convert",
    "cost",
    "devices",
    "errors",
    "graphs",
    "health",
    "models",
    "packing",
    "prometheus",
    "runner",
    "serve",
    "shaping",
    "stats",
}
PACKAGES = [
    "packrunner",
    *(f"packrunner.{name}" for name in ("devices", "models", "convert", "graphs", "serve")),
]


def exported(module: ModuleType) -> set[str]:
    """Public names bound in ``module`` other than submodules and ``__future__`` features."""
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, ModuleType | __future__._Feature)
    }


@pytest.mark.parametrize("name", PACKAGES)
def test_all_is_exactly_what_the_package_exports(name):
    package = importlib.import_module(name)
    stray = exported(package) - set(package.__all__)
    missing = {n for n in package.__all__ if not hasattr(package, n)}
    assert not stray, f"{name} exports names missing from __all__: {sorted(stray)}"
    assert not missing, f"{name}.__all__ names what it does not define: {sorted(missing)}"


def test_top_level_modules_are_public_only_when_meant_to_be():
    names = {m.name for m in pkgutil.iter_modules(packrunner.__path__)}
    public = {n for n in names if not n.startswith("_")}
    assert public == PUBLIC_MODULES
    assert "__version__" in packrunner.__all__


def test_every_module_all_names_exist():
    for info in pkgutil.walk_packages(packrunner.__path__, "packrunner."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name in getattr(module, "__all__", ()):
            assert hasattr(module, name), f"{info.name}.__all__ names missing {name!r}"


def test_errors_share_one_base():
    errors = importlib.import_module("packrunner.errors")
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), packrunner.PackRunnerError), name
