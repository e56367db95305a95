"""mkdocs hooks.

- The benchmark figures live in bench/results/, where `python -m bench plot` writes
  them; the site serves them from there instead of keeping copies.
- The docstrings name other objects with Sphinx roles (:func:`nw_pool`); the API pages
  show the name as code, without the role.
"""

import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
ROLE = re.compile(r":(?:func|class|meth|mod|attr):(?=<code>)")


def on_files(files, config):
    for png in sorted((ROOT / "bench" / "results").glob("*.png")):
        path = png.relative_to(ROOT).as_posix()
        files.append(File(path, str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files


def on_page_content(html, page, config, files):
    return ROLE.sub("", html)
