"""Sphinx configuration: ``make docs`` builds the API reference and the notebooks into docs/_build/html.

The API pages (docs/api/) and the notebooks' copies (docs/notebooks/) are generated at every build by
docs/_ext/gradtx_api.py from ``gradtx.__all__`` and notebooks/, and ignored by git. The notebooks are
rendered with the outputs stored in them; ``make test`` executes them.
"""

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
sys.path.insert(0, str(HERE.parent))  # this checkout's gradtx, also when it is not installed
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import gradtx  # noqa: E402

project = "gradtx"
author = "the gradtx authors"
copyright = "the gradtx authors"
release = version = gradtx.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "myst_nb",
    "gradtx_api",
]

# Docstrings are reST whose `single backticks` name other gradtx objects: `chain`, `gradtx.sweep`.
default_role = "py:obj"
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True  # show defaults as written (``jnp.float32``), not as reprs
autodoc_typehints = "signature"
autosummary_generate = False  # the pages are written by gradtx_api, from gradtx.__all__
add_module_names = False

# Notebooks: rendered with the outputs stored in them, never executed here.
nb_execution_mode = "off"
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "_ext", "**/.ipynb_checkpoints"]

html_theme = "sphinx_book_theme"
html_title = "gradtx"
html_theme_options = {"show_toc_level": 2}
