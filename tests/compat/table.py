"""The "Supported setups" table of the documentation, generated from the compatibility suite's cases.

    python tests/compat/table.py           # print the table
    python tests/compat/table.py --write   # put it into docs/guides/supported-setups.md, between the setups markers

Every row is a :class:`~harness.Case` of a test module here (in a list such as ``CASES`` or a module-level constant),
with its ``setup``, ``status`` and ``note``; a module with cases names its family in ``FAMILY``, which heads its rows.
``test_readme_table.py`` fails while the page's table differs from this one.
"""

import argparse
import difflib
import importlib
import sys
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
PAGE = HERE.parents[1] / "docs" / "guides" / "supported-setups.md"
START, END = "<!-- setups:start -->", "<!-- setups:end -->"
WRITE = "python tests/compat/table.py --write"
# The families' order in the table; a test module not listed here follows, by file name.
ORDER = (
    "test_compile",
    "test_module_hooks",
    "test_callbacks",
    "test_optimizers",
    "test_transformers",
    "test_precision_and_short_runs",
    "test_batched",
)

if str(HERE) not in sys.path:  # run as a script from anywhere; under pytest the folder is on sys.path already
    sys.path.insert(0, str(HERE))

from harness import Case  # noqa: E402


def compat_modules() -> list[ModuleType]:
    """Every ``test_*.py`` here, imported (the modules pytest imports, when it has), in table order."""
    names = sorted(path.stem for path in HERE.glob("test_*.py"))
    ordered = [name for name in ORDER if name in names] + [name for name in names if name not in ORDER]
    return [importlib.import_module(name) for name in ordered]


def cases_in(module: ModuleType) -> list[Case]:
    """The module's cases in the order it defines them: module-level ``Case`` constants, and lists or tuples of them."""
    found: list[Case] = []
    for value in list(vars(module).values()):
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, Case) and all(item is not case for case in found):
                found.append(item)
    return found


def families() -> list[tuple[str, str, list[Case]]]:
    """(family, file name, cases) of every test module with a ``FAMILY``, in table order. A case that only a module
    without ``FAMILY`` holds (one that reuses other modules' cases, such as ``test_finder_setups.py``, has none of
    its own) is an error: it would be missing from the table."""
    modules = compat_modules()
    table = [(module.FAMILY, f"{module.__name__}.py", cases_in(module)) for module in modules
             if hasattr(module, "FAMILY")]
    listed = {id(case) for _, _, cases in table for case in cases}
    for module in modules:
        strays = [case.name for case in cases_in(module) if id(case) not in listed]
        if strays:
            raise ValueError(f"{module.__name__}.py defines the cases {strays} but no FAMILY to list them under")
    names = [case.name for _, _, cases in table for case in cases]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"two cases share a name: {repeated}")
    return table


def all_cases() -> list[Case]:
    """Every case of the suite, in table order."""
    return [case for _, _, cases in families() for case in cases]


def cell(text: str) -> str:
    """``text`` as one Markdown table cell."""
    return " ".join(text.split()).replace("|", r"\|")


def render() -> str:
    """The Markdown table: a header row per family, then a row per case."""
    lines = ["| setup | case | status | note |", "|---|---|---|---|"]
    for family, filename, cases in families():
        lines.append(f"| **{cell(family)}** (`{filename}`) | | | |")
        for case in cases:
            lines.append(f"| {cell(case.setup)} | `{cell(case.name)}` | {case.status} | {cell(case.note)} |")
    return "\n".join(lines)


def between_markers(text: str) -> str:
    """The text between the setups markers of the page's ``text``."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{PAGE.name} needs the markers {START} and then {END}")
    return text[start + len(START):end]


def section(table: str) -> str:
    """What stands between the markers: the table on lines of its own."""
    return f"\n{table}\n"


def with_table(text: str, table: str) -> str:
    """The page's ``text`` with ``table`` between the markers, and nothing else changed."""
    between_markers(text)  # the markers are there, in order
    start = text.index(START) + len(START)
    return text[:start] + section(table) + text[text.index(END):]


def difference(text: str, table: str) -> str:
    """A unified diff from the page's table (``text``) to ``table``; empty when they agree."""
    return "\n".join(difflib.unified_diff(between_markers(text).splitlines(), section(table).splitlines(),
                                          PAGE.name, "generated", lineterm=""))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="replace the table between the page's markers")
    table = render()
    if not parser.parse_args(argv).write:
        print(table)
        return 0
    text = PAGE.read_text(encoding="utf-8")
    updated = with_table(text, table)
    if updated == text:
        print(f"{PAGE}: the table is current")
    else:
        PAGE.write_text(updated, encoding="utf-8")
        print(f"{PAGE}: wrote the table ({len(all_cases())} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
