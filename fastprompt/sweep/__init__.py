"""Sweeps (grid -> one run per cell, resumable), paper tables from their results, and the
accuracy-against-shots figure: `fastprompt sweep`, `fastprompt report`, `fastprompt plot shots`."""

from fastprompt.sweep.grid import Cell, PlannedCell, SweepConfig, expand, plan
from fastprompt.sweep.runner import SweepOutcome, prepare, run_sweep

__all__ = ["Cell", "PlannedCell", "SweepConfig", "SweepOutcome", "expand", "plan", "prepare", "run_sweep"]
