"""The layers: imports go one way, and the endpoint contract is declared, never probed.

Rule 1 (import direction): endpoints/ < methods/ < io/ < run/ < the top (api.py, cli.py, server.py,
__init__.py). A module imports from its own layer or a lower one, never a higher one; the shared
leaf modules (wording.py, version.py, errors.py) import nothing of the package and anyone may use them.

Rule 2 (the contract is declared):

Rule: outside the endpoint modules (the contract, its backends and their wire), no module of
src/logprob_cli calls hasattr, getattr or isinstance with an endpoint as its first argument. An
endpoint is recognised by its name: a variable or attribute whose name contains "endpoint" or
"metered" (endpoint, self.endpoint, metered, ...). What a caller needs of an endpoint is a member
of `Endpoint` with a default (endpoints/_base.py); a new capability is added there, not probed for.
"""

import ast
from pathlib import Path

import logprob_cli

PACKAGE = Path(logprob_cli.__file__).parent
# The endpoint layer: the contract and its backends may look inside endpoints.
ENDPOINT_MODULES: set[str] = set()
LAYERS = {"endpoints": 0, "methods": 1, "io": 2, "run": 3}
TOP = 4
SHARED = {"wording", "version", "errors"}
PROBES = {"hasattr", "getattr", "isinstance"}
ENDPOINT_WORDS = ("endpoint", "metered")


def _above_the_endpoint_layer(path: Path) -> bool:
    parts = path.relative_to(PACKAGE).parts
    return "endpoints" not in parts[:-1] and path.stem not in ENDPOINT_MODULES


def _name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def endpoint_probes(source: str) -> list[tuple[int, str]]:
    """(line, call) of every hasattr/getattr/isinstance whose first argument is named like an endpoint."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in PROBES and node.args:
            if any(word in _name(node.args[0]).lower() for word in ENDPOINT_WORDS):
                found.append((node.lineno, ast.unparse(node)))
    return sorted(found)


def test_nothing_above_the_endpoint_layer_probes_an_endpoint():
    modules = [path for path in sorted(PACKAGE.rglob("*.py")) if _above_the_endpoint_layer(path)]
    assert len(modules) > 10, "the package's modules were not found"
    probes = [
        f"{path.relative_to(PACKAGE)}:{line}: {call}"
        for path in modules
        for line, call in endpoint_probes(path.read_text(encoding="utf-8"))
    ]
    assert not probes, "use a declared member of Endpoint instead:\n" + "\n".join(probes)


def test_the_rule_catches_each_kind_of_probe():
    """The check itself can fail: each probe the rule forbids is found, and other calls pass."""
    source = (
        "hasattr(endpoint, 'aclose')\n"
        "getattr(self.endpoint, 'withheld_tokens', frozenset())\n"
        "isinstance(metered, SimulatedEndpoint)\n"
        "isinstance(error, EndpointRejected)\n"
        "getattr(config, 'seed')\n"
    )
    assert [line for line, _ in endpoint_probes(source)] == [1, 2, 3]


def layer_of(module: str) -> int | None:
    """The layer of a dotted module name inside the package (None for a shared leaf module)."""
    parts = module.split(".")[1:]
    if not parts:
        return TOP
    if parts[0] in SHARED:
        return None
    return LAYERS.get(parts[0], TOP)


def upward_imports(path: Path) -> list[str]:
    """Every import in `path` of a package module in a higher layer than the module's own."""
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    module = ".".join(relative.parts).removesuffix(".__init__")
    own = layer_of(module)
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = [node.module]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        for target in targets:
            if not target.startswith("logprob_cli"):
                continue
            layer = layer_of(target)
            if own is None and target != module:
                found.append(f"{module}:{node.lineno} imports {target} (a shared leaf module imports nothing)")
            elif layer is not None and own is not None and layer > own:
                found.append(f"{module}:{node.lineno} imports {target}")
    return found


def test_imports_go_one_way_through_the_layers():
    modules = sorted(PACKAGE.rglob("*.py"))
    relative = [path for path in modules if any(isinstance(node, ast.ImportFrom) and node.level
                                                for node in ast.walk(ast.parse(path.read_text())))]
    assert not relative, f"relative imports hide the layer: {relative}"
    upward = [line for path in modules for line in upward_imports(path)]
    assert not upward, "a module imports a higher layer:\n" + "\n".join(upward)


def test_the_direction_rule_catches_an_upward_import(tmp_path, monkeypatch):
    """The check itself can fail: an endpoints module importing run/ is caught, a run module importing endpoints/ is not."""
    package = tmp_path / "logprob_cli"
    (package / "endpoints").mkdir(parents=True)
    (package / "run").mkdir()
    (package / "endpoints" / "bad.py").write_text("from logprob_cli.run._runner import extract_batch\n")
    (package / "run" / "good.py").write_text("from logprob_cli.endpoints._base import Query\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", package)
    assert upward_imports(package / "endpoints" / "bad.py") == ["logprob_cli.endpoints.bad:1 imports logprob_cli.run._runner"]
    assert upward_imports(package / "run" / "good.py") == []


def private_reaches(path: Path) -> list[str]:
    """Every import in `path` of another package's private module (logprob_cli.<pkg>._<module>)."""
    relative = path.relative_to(PACKAGE).parts
    own = relative[0] if len(relative) > 1 else None
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[0] == "logprob_cli" and len(parts) > 2 and parts[2].startswith("_") and parts[1] != own:
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} imports {node.module}")
    return found


def test_packages_are_entered_through_their_public_face():
    """Rule 3: each package's modules are private (_name.py); other packages import what the package's
    __init__ exports (its __all__), so a package may rearrange its modules without touching its users."""
    modules = sorted(PACKAGE.rglob("*.py"))
    public_inside = [str(path.relative_to(PACKAGE)) for path in modules
                     if path.parent != PACKAGE and path.stem != "__init__" and not path.stem.startswith("_")]
    assert not public_inside, f"modules inside a package are private: {public_inside}"
    reaches = [line for path in modules for line in private_reaches(path)]
    assert not reaches, "import from the package, not its private module:\n" + "\n".join(reaches)


def test_the_face_rule_catches_a_private_reach(tmp_path, monkeypatch):
    package = tmp_path / "logprob_cli"
    (package / "run").mkdir(parents=True)
    (package / "run" / "_bad.py").write_text("from logprob_cli.endpoints._base import Query\n")
    (package / "run" / "_good.py").write_text("from logprob_cli.endpoints import Query\nfrom logprob_cli.run._journal import Refused\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", package)
    assert private_reaches(package / "run" / "_bad.py") == ["run/_bad.py:1 imports logprob_cli.endpoints._base"]
    assert private_reaches(package / "run" / "_good.py") == []
