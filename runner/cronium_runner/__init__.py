"""cronium-runner: the program that runs a cronium payload on a server.

It imports nothing from ``cronium_nb``; the orchestrator imports its manifest schema and its
output protocol from here, so that each has one definition.
"""

__version__ = "0.1.0"
