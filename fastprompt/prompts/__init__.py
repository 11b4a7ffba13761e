"""Prompt learners and hand-crafted prompts: the parts methods compose."""
