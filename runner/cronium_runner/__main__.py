import sys

from cronium_runner.cli import main

sys.exit(main())
