"""The README stays a five-minute read: depth goes to docs/."""
from conftest import REPO

README_MAX_LINES = 150  # issue 22: later issues keep it so


def test_the_readme_is_at_most_150_lines():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines; move detail to docs/ (at most {README_MAX_LINES})")
