"""No function in snapfs/ is over 60 lines (issue 22): a long function is a component that
has not been named yet. The benchmark and the tests are not counted."""

import ast
import pathlib

import snapfs

LIMIT = 60
# Functions allowed to be longer ("snapfs/module.py name" → why); none today.
ALLOWED: dict[str, str] = {}


def long_functions(root: pathlib.Path) -> list[tuple[int, str]]:
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno is not None
                lines = node.end_lineno - node.lineno + 1
                module = path.relative_to(root.parent)
                if lines > LIMIT and f"{module} {node.name}" not in ALLOWED:
                    found.append((lines, f"{module}:{node.lineno} {node.name}"))
    return sorted(found, reverse=True)


def test_no_function_in_snapfs_is_over_60_lines():
    found = long_functions(pathlib.Path(snapfs.__file__).parent)
    assert not found, f"functions over {LIMIT} lines:\n" + "\n".join(f"{n} {w}" for n, w in found)
