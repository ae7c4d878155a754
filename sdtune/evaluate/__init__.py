"""Evaluation: loading the variants, sampling, CLIP and the metrics, the image grid and the table."""
