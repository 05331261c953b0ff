"""Runs a Python script with ``cronium`` available as a builtin: python3 bootstrap.py SCRIPT."""

import builtins
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cronium as _helpers

builtins.cronium = _helpers.cronium
script = os.path.abspath(sys.argv[1])
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(script)
runpy.run_path(script, run_name="__main__")
