"""Evaluation: ANLS and exact match, greedy generation, the before/after report and the adapter's model card."""
