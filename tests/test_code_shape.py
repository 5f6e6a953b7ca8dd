"""The shape rules of the package: no file in lambo_ray/ over 500 lines, no function over 80 lines or with
more than 12 parameters (``self``/``cls`` not counted). Small modules and short functions are what lets
the next engineer change one thing without reading ten.

``KNOWN_OFFENDERS`` lists what is being split right now; it is printed on every run, marking entries that
no longer offend (remove them): the list must only shrink.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lambo_ray"
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80
MAX_PARAMETERS = 12

# (path relative to lambo_ray/, function name or None for the file's length). To be emptied.
KNOWN_OFFENDERS: set[tuple[str, str | None]] = set()


def _parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    a = node.args
    names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    names += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
    return names[1:] if names and names[0] in ("self", "cls") else names


def offences(root: Path = PACKAGE) -> dict[tuple[str, str | None], str]:
    found: dict[tuple[str, str | None], str] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        text = path.read_text()
        lines = len(text.splitlines())
        if lines > MAX_FILE_LINES:
            found[(rel, None)] = f"{rel}: {lines} lines (max {MAX_FILE_LINES})"
        for node in ast.walk(ast.parse(text, filename=str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = node.end_lineno - node.lineno + 1
            params = _parameters(node)
            problems = []
            if length > MAX_FUNCTION_LINES:
                problems.append(f"{length} lines (max {MAX_FUNCTION_LINES})")
            if len(params) > MAX_PARAMETERS:
                problems.append(f"{len(params)} parameters (max {MAX_PARAMETERS})")
            if problems:
                found[(rel, node.name)] = f"{rel}:{node.lineno} {node.name}: " + ", ".join(problems)
    return found


def test_no_oversized_file_or_function():
    found = offences()
    print("\nallow-listed while being split (to be emptied):")
    for key in sorted(KNOWN_OFFENDERS, key=str):
        print("  ", found.get(key, f"{key}: no longer offends, remove it from KNOWN_OFFENDERS"))
    new = [msg for key, msg in sorted(found.items(), key=str) if key not in KNOWN_OFFENDERS]
    assert not new, "code shape rules broken:\n" + "\n".join(new)


def test_the_checker_catches_each_rule(tmp_path):
    """On a synthetic package: an 81-line function, a 13-parameter method and a 501-line file are caught,
    and their 80-line, 12-parameter and 500-line neighbours are not."""
    body = lambda n: "\n".join(f"    x{i} = {i}" for i in range(n - 2)) + "\n    return 0\n"  # noqa: E731
    params = lambda n: ", ".join(f"a{i}" for i in range(n))  # noqa: E731
    (tmp_path / "funcs.py").write_text(
        f"def long():\n{body(81)}\n\ndef fits():\n{body(80)}\n"
        f"class C:\n    def many(self, {params(13)}):\n        pass\n\n    def ok(self, {params(12)}):\n        pass\n"
    )
    (tmp_path / "big.py").write_text("x = 1\n" * 501)
    (tmp_path / "edge.py").write_text("x = 1\n" * 500)
    found = offences(tmp_path)
    assert set(found) == {("funcs.py", "long"), ("funcs.py", "many"), ("big.py", None)}
    assert "81 lines" in found[("funcs.py", "long")] and "13 parameters" in found[("funcs.py", "many")]


def test_only_the_command_line_imports_the_commands():
    """Layering: the library (and the benchmarks) never import ``lambo_ray.commands``; commands import it."""
    allowed = {"cli.py"}
    offenders = []
    roots = [(PACKAGE, ""), (PACKAGE.parent / "benchmarks", "../benchmarks/")]
    for root, label in roots:
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if label == "" and (rel in allowed or rel.startswith("commands/")):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                offenders += [
                    f"{label}{rel}:{node.lineno} imports {n}" for n in names if n.startswith("lambo_ray.commands")
                ]
    assert not offenders, "\n".join(offenders)
