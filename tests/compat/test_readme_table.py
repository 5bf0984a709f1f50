"""The documentation's "Supported setups" table (docs/guides/supported-setups.md) is the one ``table.py`` generates
from the suite's cases: a case added, renamed or re-rated without ``python tests/compat/table.py --write`` fails here."""

from table import PAGE, WRITE, between_markers, difference, render, section


def test_the_supported_setups_table_is_the_generated_one():
    text = PAGE.read_text(encoding="utf-8")
    table = render()
    assert between_markers(text) == section(table), (
        f"{PAGE.name}'s Supported setups table is not the one the suite generates: run `{WRITE}`.\n"
        f"{difference(text, table)}"
    )
