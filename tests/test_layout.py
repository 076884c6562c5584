"""The package's layering: the SDK depends on core, never the other way round."""

import ast
from pathlib import Path

import pytest

import mctl

PACKAGE = Path(mctl.__file__).parent
CORE = PACKAGE / "core"


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """Every module or name an import statement takes from, at any depth (inside functions and
    `if TYPE_CHECKING:` blocks too): `from mctl import App` gives `mctl.App`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def uses_sdk(module: str) -> bool:
    """`mctl.sdk...`, or the SDK's names through the package (`import mctl`, `from mctl import
    App`); the package's other modules (`mctl.exception`, `mctl.core...`) are fine."""
    if module == "mctl" or module.startswith("mctl.sdk"):
        return True
    parts = module.split(".")
    if parts[0] != "mctl" or len(parts) != 2:
        return False
    return not ((PACKAGE / f"{parts[1]}.py").exists() or (PACKAGE / parts[1]).is_dir())


def test_core_does_not_import_the_sdk():
    offenders = []
    for path in sorted(CORE.rglob("*.py")):
        for line, module in imported_modules(ast.parse(path.read_text(), str(path))):
            if uses_sdk(module):
                offenders.append(f"{path.relative_to(PACKAGE)}:{line} imports {module}")
    assert offenders == []


def test_the_check_sees_every_kind_of_import():
    source = ("import mctl\nfrom mctl import App, exception\n"
              "def f():\n    if True:\n        from mctl.sdk.cls import Cls\n")
    flagged = [m for _, m in imported_modules(ast.parse(source)) if uses_sdk(m)]
    assert flagged == ["mctl", "mctl.App", "mctl.sdk.cls.Cls"]


@pytest.mark.integration
def test_serialized_class_runs_its_lifecycle_in_the_worker():
    """Core reaches a class's @enter through the object its handle ships (a ClassRunner), also
    for a class defined inside a function and pickled by value."""
    app = mctl.App("layout-serialized")

    @app.cls(serialized=True)
    class Greeter:
        greeting: str = mctl.parameter(default="hello")

        @mctl.enter()
        def load(self):
            self.suffix = "!"

        @mctl.method()
        def greet(self, name):
            return f"{self.greeting} {name}{self.suffix}"

    with app.run():
        assert Greeter(greeting="hi").greet.remote("ops") == "hi ops!"
