"""README.md's "Supported setups" table is the one ``table.py`` generates from the suite's cases: a case added,
renamed or re-rated without ``python tests/compat/table.py --write`` fails here."""

from table import README, WRITE, between_markers, difference, render, section


def test_the_readme_table_is_the_generated_one():
    text = README.read_text(encoding="utf-8")
    table = render()
    assert between_markers(text) == section(table), (
        f"README.md's Supported setups table is not the one the suite generates: run `{WRITE}`.\n"
        f"{difference(text, table)}"
    )
