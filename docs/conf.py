"""Sphinx configuration for jstate's documentation site.

Build (from the repository root, after ``pip install -e ".[docs]"``):

    sphinx-build -W --keep-going -n -b html docs docs/_build/html

``-W`` turns every warning into an error and ``-n`` reports every cross-reference that does not
resolve, so a renamed function or a stale link fails the build instead of rotting quietly.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Executed pages (guides and notebooks) choose their own devices; the API pages import jstate here,
# which needs no devices, so this process keeps JAX on the CPU and quiet.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jstate  # noqa: E402


def _copy_notebooks() -> None:
    """Mirror ../notebooks/*.ipynb into docs/notebooks/ (git-ignored), where Sphinx finds them.

    The notebooks live once, at the top of the repository, where the tests run them. A symlink
    would do, but Sphinx resolves it, and the notebooks' links to each other then point outside
    the site. Unchanged files are left alone, so their modification times (and the build cache)
    hold.
    """
    mirror = Path(__file__).parent / "notebooks"
    mirror.mkdir(exist_ok=True)
    sources = {p.name: p for p in (ROOT / "notebooks").glob("*.ipynb")}
    for stale in mirror.glob("*.ipynb"):
        if stale.name not in sources:
            stale.unlink()
    for name, source in sources.items():
        copy = mirror / name
        if not copy.exists() or copy.read_bytes() != source.read_bytes():
            shutil.copy2(source, copy)


_copy_notebooks()

project = "jstate"
author = "the jstate authors"
copyright = "2026, the jstate authors"
release = version = jstate.__version__

extensions = [
    "myst_nb",  # MyST Markdown pages and notebooks, executed at build time
    "sphinx.ext.autodoc",  # the API reference, from the docstrings
    "sphinx.ext.napoleon",  # Args: / Returns: / Raises: sections
    "sphinx.ext.viewcode",  # a [source] link beside every entry
]

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}

# -- HTML: the theme Flax, Orbax and Optax use ------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = f"jstate {version}"
html_static_path = ["_static"]
# The project's addresses live once, in pyproject.toml's [project.urls].
with open(ROOT / "pyproject.toml", "rb") as f:
    URLS = tomllib.load(f)["project"]["urls"]
html_theme_options = {
    "repository_url": URLS["Homepage"],
    "use_repository_button": True,
    "show_toc_level": 2,
    "path_to_docs": "docs",
}

# -- MyST and notebook execution ---------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3
# Every guide and notebook runs at build time, in a fresh temporary directory (what they write
# lands there). "cache" keeps each page's outputs in docs/_build/.jupyter_cache keyed by its code,
# so a rebuild re-runs only the pages whose code changed.
nb_execution_mode = os.environ.get("JSTATE_DOCS_EXECUTE", "cache")
nb_execution_cache_path = str(Path(__file__).parent / "_build" / ".jupyter_cache")
nb_execution_in_temp = True
nb_execution_timeout = 300
nb_execution_raise_on_error = True  # a failing cell fails the build
nb_execution_show_tb = True
nb_merge_streams = True

# -- API reference -----------------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_class_signature = "separated"
autodoc_default_options = {"exclude-members": "__init__, __new__"}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# Docstrings quote code in single backticks (`State`): show it as code, resolved or not.
default_role = "code"

# Nitpicky mode (-n) checks every reference. The site builds offline, without intersphinx, so
# references to Python's, NumPy's, JAX's, Flax's and Orbax's objects are shown but not linked;
# every reference into jstate must resolve.
nitpicky = True
nitpick_ignore_regex = [(r"py:.*", r"(?!jstate\b).*")]


def _exists(target: str) -> bool:
    """Whether a dotted name such as ``jstate.checkpoint.restore.Plan`` names a real object."""
    module, _, attr = target.rpartition(".")
    while module:
        try:
            obj = importlib.import_module(module)
        except ImportError:
            module, _, head = module.rpartition(".")
            attr = f"{head}.{attr}"
            continue
        for part in attr.split("."):
            if not hasattr(obj, part):
                return False
            obj = getattr(obj, part)
        return True
    return False


def _public_name(app, env, node, contnode):
    """Resolve ``jstate.model.state.State`` (how annotations name it) to ``jstate.State``.

    The reference documents each public object once, under the name users import it by; type
    annotations name the module that defines it. A private type an annotation names (a
    `TypeVar`, the `Plan` that `Saver.plan` returns) is shown as text. A name that exists
    nowhere still fails the build.
    """
    target = node.get("reftarget", "")
    if node.get("refdomain") != "py" or not target.startswith("jstate."):
        return None
    tail = target.split(".")
    domain = env.get_domain("py")
    for i in range(len(tail) - 1, 0, -1):
        public = "jstate." + ".".join(tail[i:])
        if public != target and tail[i] in vars(jstate) and not tail[i].startswith("_"):
            found = domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], public, node, contnode)
            if found is not None:
                return found
    if len(tail) > 2 and tail[1] in _PRIVATE_FOLDERS and _exists(target):
        return contnode
    return None


# The folders under jstate/ whose types annotations may name without their being public.
_PRIVATE_FOLDERS = {"core", "storage", "model", "formats", "checkpoint"}


def _plural_code(app, what, name, obj, options, lines):
    """Let docstrings write "`jax.Device`s": reST needs a break between code and a trailing "s"."""
    lines[:] = [re.sub(r"(`[^`\s][^`]*`)s\b", r"\1\\ s", line) for line in lines]


def setup(app):
    app.connect("missing-reference", _public_name)
    app.connect("autodoc-process-docstring", _plural_code)
