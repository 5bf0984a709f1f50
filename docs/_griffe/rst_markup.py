"""A griffe extension for the documentation build: the docstrings' few reStructuredText constructs, in Markdown.

The docstrings are Google style (``Args:``, ``Returns:``, ``Raises:``, ``Example:``) but some use Sphinx roles
(``:func:`~lightning_chaos.functional.best_window_fit```), ``.. math::`` and literal blocks after ``Example::``, and
some document several arguments in one entry (``lr, momentum: the param group's values``). mkdocstrings renders
Markdown and one entry per argument, so this turns them into code spans, fenced code blocks and one entry per name;
the source stays as it is.
"""

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|mod|data|obj|exc|const):`(~?)([^`]+)`")
_MATH = re.compile(r"^(\s*)\.\. math::\s*(.*)$")
_LITERAL = re.compile(r"^(\s*)(\w[\w ]*)::\s*$")  # "Example::" opening an indented literal block
_ARGS = re.compile(r"^(\s*)(?:Args|Arguments|Parameters|Other Parameters):\s*$")
_GROUPED = re.compile(r"^(\s+)(\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)+):(\s.*)?$")  # "a, b, c: description"


def _role(match: "re.Match[str]") -> str:
    short, target = match.group(1), match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def split_grouped_arguments(text: str) -> str:
    """In ``Args:`` sections, an entry naming several arguments becomes one entry per name, each with the text."""
    lines = text.split("\n")
    out: list[str] = []
    section: "int | None" = None  # the indentation of the current Args: header
    i = 0
    while i < len(lines):
        line = lines[i]
        header = _ARGS.match(line)
        if header:
            section = len(header.group(1))
        elif section is not None and line.strip() and _indent(line) <= section:
            section = None
        grouped = _GROUPED.match(line) if section is not None else None
        if grouped and _indent(line) > section:
            j = i + 1
            while j < len(lines) and lines[j].strip() and _indent(lines[j]) > _indent(line):
                j += 1
            rest = lines[i + 1:j]
            for name in (n.strip() for n in grouped.group(2).split(",")):
                out.append(f"{grouped.group(1)}{name}:{grouped.group(3) or ''}")
                out.extend(rest)
            i = j
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


def markdown(text: str) -> str:
    """``text`` with Sphinx roles as code spans, ``.. math::`` and ``Name::`` literal blocks as fenced code, and
    grouped argument entries split."""
    lines = split_grouped_arguments(_ROLE.sub(_role, text)).split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        math, literal = _MATH.match(line), _LITERAL.match(line)
        if not (math or literal):
            out.append(line)
            i += 1
            continue
        base = _indent(line)
        j = i + 1
        while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > base):
            j += 1
        block = [b for b in lines[i + 1:j]]
        while block and not block[-1].strip():
            block.pop()
        while block and not block[0].strip():
            block.pop(0)
        inner = min((_indent(b) for b in block if b.strip()), default=0)
        body = [b[inner:] for b in block]
        if math:
            body = ([math.group(2).strip()] if math.group(2).strip() else []) + body
            pad = " " * base
        else:
            out.append(f"{' ' * base}{literal.group(2)}:")
            pad = " " * (base + 4)
        out.append(f"{pad}```{'text' if math else 'python'}")
        out.extend(pad + b if b.strip() else "" for b in body)
        out.append(f"{pad}```")
        if j < len(lines):
            out.append("")
        i = j
    return "\n".join(out)


class RstMarkup(griffe.Extension):
    """Rewrites every docstring the documentation loads (see :func:`markdown`)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
