"""PyInstaller entry point of the standalone runner bundle."""

import sys

from cronium_runner.cli import main

sys.exit(main())
