"""MkDocs hooks for this site (mkdocs.yml: `hooks: [docs/hooks.py]`).

1. Pictures under bench/results/ are generated there and live outside docs/. Every PNG under
   bench/results/ is added to the site as bench-results/<path below bench/results>, and a page's
   relative image link into bench/results (`../bench/results/demo/run/before_after.png` from
   docs/world.md, the link GitHub shows) is rewritten to that copy. A link to a PNG that does not
   exist is left alone, so `mkdocs build --strict` fails on it.
2. Result tables included with pymdownx.snippets are written by scripts that print prompts such as
   `a <sks> star <place>` as plain text. Markdown passes `<place>` through as an HTML tag, which a
   browser hides; tags that are not HTML are shown as text again.
"""
from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

RESULTS = "bench/results"
SITE_DIR = "bench-results"

_IMAGE_LINK = re.compile(r"\]\(((?:\.\./)+" + re.escape(RESULTS) + r"/[^)\s]+\.png)\)")
_TAG = re.compile(r"<(/?)([A-Za-z][^<>@ ]*)((?: [^<>]*)?)>")
_HTML_TAGS = frozenset("""
a abbr address area article aside audio b bdi bdo blockquote br button canvas caption cite code col
colgroup data dd del details dfn dialog div dl dt em embed fieldset figcaption figure footer form h1 h2
h3 h4 h5 h6 header hr i iframe img input ins kbd label legend li main mark math nav ol optgroup option
output p path picture pre q rect s samp section select small source span strong sub summary sup svg
table tbody td template textarea tfoot th thead time tr track u ul var video wbr
""".split())


def _repo(config) -> Path:
    return Path(config.config_file_path).resolve().parent


def on_files(files, config):
    repo = _repo(config)
    for png in sorted((repo / RESULTS).rglob("*.png")):
        rel = png.relative_to(repo / RESULTS).as_posix()
        if rel.startswith("cpu-smoke/"):
            continue
        files.append(File.generated(config, f"{SITE_DIR}/{rel}", abs_src_path=str(png)))
    return files


def on_page_markdown(markdown, page, config, files):
    repo = _repo(config)
    page_dir = Path(page.file.abs_src_path).parent
    src_dir = posixpath.dirname(page.file.src_uri)

    def rewrite(m: re.Match) -> str:
        target = (page_dir / m.group(1)).resolve()
        try:
            rel = target.relative_to(repo / RESULTS).as_posix()
        except ValueError:
            return m.group(0)
        if not target.is_file():
            return m.group(0)
        return "](" + posixpath.relpath(f"{SITE_DIR}/{rel}", src_dir or ".") + ")"

    return _IMAGE_LINK.sub(rewrite, markdown)


def on_page_content(html, page, config, files):
    def escape(m: re.Match) -> str:
        if m.group(2).rstrip("/").lower() in _HTML_TAGS:
            return m.group(0)
        return "&lt;" + m.group(0)[1:-1] + "&gt;"

    return _TAG.sub(escape, html)
