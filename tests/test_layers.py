"""The endpoint contract is declared, never probed.

Rule: outside the endpoint modules (the contract, its backends and their wire), no module of
src/logprob_cli calls hasattr, getattr or isinstance with an endpoint as its first argument. An
endpoint is recognised by its name: a variable or attribute whose name contains "endpoint" or
"metered" (endpoint, self.endpoint, metered, ...). What a caller needs of an endpoint is a member
of `Endpoint` with a default (endpoint.py); a new capability is added there, not probed for.
"""

import ast
from pathlib import Path

import logprob_cli

PACKAGE = Path(logprob_cli.__file__).parent
# The endpoint layer: the contract and its backends may look inside endpoints (a flat module here, or
# anything in an `endpoints` package).
ENDPOINT_MODULES = {"endpoint", "simulator", "openai_endpoint", "transport", "ratelimit", "vocabulary", "urls"}
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
