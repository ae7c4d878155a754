"""Evaluation: CLIP loading and the metrics the evaluate stage reports."""
