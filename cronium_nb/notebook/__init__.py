"""The notebook layer: magics, live views, the dashboard. Load it with ``%load_ext cronium_nb``."""

from cronium_nb.notebook.dashboard import Dashboard
from cronium_nb.notebook.magics import load_ipython_extension

__all__ = ["Dashboard", "load_ipython_extension"]
