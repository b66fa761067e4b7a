"""The documentation: README.md is the front door, docs/ the pages, built by MkDocs strictly (`make docs`)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def nav_pages(nav) -> list[str]:
    """Every page file a mkdocs.yml nav names, nested sections included."""
    pages = []
    for entry in nav:
        for value in (entry.values() if isinstance(entry, dict) else [entry]):
            pages += nav_pages(value) if isinstance(value, list) else [value]
    return pages


def anchors(markdown: str) -> set[str]:
    """The heading ids Python-Markdown's toc extension gives (its default slugify), outside code blocks."""
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)
    ids = set()
    for title in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, flags=re.M):
        slug = re.sub(r"[^\w\s-]", "", title.replace("`", "")).strip().lower()
        ids.add(re.sub(r"[-\s]+", "-", slug))
    return ids


def test_the_site_builds_strictly_with_no_warning(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNING" not in output, output
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "recipes" / "index.html").is_file()


def test_every_docs_page_is_in_the_nav_and_every_nav_entry_is_a_page():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["theme"]["name"] == "material" and config["strict"] is True
    pages = nav_pages(config["nav"])
    assert len(pages) == len(set(pages)), pages
    assert sorted(pages) == sorted(p.name for p in (ROOT / "docs").glob("*.md"))


def test_the_readme_is_a_front_door_whose_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    first_block = re.search(r"```bash\n(.*?)```", readme, flags=re.S).group(1)
    assert [line.split()[:2] for line in first_block.splitlines()[:2]] == [["make", "demo"], ["make", "test"]]
    links = LINK.findall(readme)
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert any(link.startswith("docs/") for link in local)
    for link in local:
        path, _, anchor = link.partition("#")
        assert not path.startswith("/"), f"README link {link}: relative file links work on GitHub and here"
        target = ROOT / path
        assert target.exists(), f"README link {link}: no file {target.relative_to(ROOT)}"
        if anchor:
            assert anchor in anchors(target.read_text()), f"README link {link}: no heading with id '{anchor}'"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {Path(link.partition("#")[0]).name for link in LINK.findall((ROOT / "README.md").read_text())
              if link.startswith("docs/")}
    assert linked >= {p.name for p in (ROOT / "docs").glob("*.md")}
