"""Data in: sources, safe extraction, image checks, captions, the latent/text cache."""
