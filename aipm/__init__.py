"""aipm: run tasks from YAML order files in parallel, safely."""

__version__ = "0.1.0"
