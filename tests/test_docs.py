"""The documentation stays complete: every public name has its entry in the API reference, and the README's links
into the documentation point at files that exist. (CI also builds the site with ``mkdocs build --strict``.)"""

import re
from pathlib import Path

import lightning_chaos
import lightning_chaos.functional

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api.md"


def test_every_public_name_is_in_the_api_reference():
    entries = set(re.findall(r"^::: (lightning_chaos[\w.]*)\s*$", API.read_text(encoding="utf-8"), re.MULTILINE))
    public = {f"lightning_chaos.{name}" for name in lightning_chaos.__all__ if not name.startswith("__")}
    public |= {f"lightning_chaos.functional.{name}" for name in lightning_chaos.functional.__all__}
    missing = sorted(public - entries)
    assert not missing, f"add a line `::: <name>` to docs/api.md for each of {missing}"


def test_the_readme_links_into_the_documentation_resolve():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", readme) if "://" not in t]
    assert targets, "the README links into docs/"
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert not missing, f"README.md links to missing files: {missing}"
