"""`fastprompt reproduce TABLE`: a published table, from CoOp's dataset folders to the paper's
numbers beside ours. Tables are data (`tables/*.toml`, `tables.py`); `plan.py` resolves what
runs where; `runner.py` runs it (prepare, zero-shot, one sweep per row); `report.py` prints it."""

from fastprompt.reproduce.plan import Plan, list_lines, make_plan, plan_lines
from fastprompt.reproduce.report import build_table, render, write_reports
from fastprompt.reproduce.runner import Outcome, run_plan
from fastprompt.reproduce.tables import PaperTable, Row, load_table, table_names

__all__ = ["Outcome", "PaperTable", "Plan", "Row", "build_table", "list_lines", "load_table", "make_plan", "plan_lines",
           "render", "run_plan", "table_names", "write_reports"]
