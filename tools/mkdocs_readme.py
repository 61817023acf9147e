"""MkDocs hook: the site's front page is README.md, so the README stays the one front page.

Its links are written for GitHub, relative to the repository root: `docs/x.md` becomes `x.md`
on the site, and a link to a source folder or file (outside docs/) keeps its text without the link.
"""

import re
from pathlib import Path

from mkdocs.structure.files import File

_LINK = re.compile(r"\[([^\]]+)\]\((?!https?://|#)([^)]+)\)")


def _site_link(match: re.Match) -> str:
    text, target = match.groups()
    if target.startswith("docs/"):
        return f"[{text}]({target.removeprefix('docs/')})"
    return text  # a source file or folder: not part of the site


def on_files(files, config):
    readme = Path(config["config_file_path"]).parent / "README.md"
    content = _LINK.sub(_site_link, readme.read_text(encoding="utf-8"))
    files.append(File.generated(config, "index.md", content=content))
    return files
