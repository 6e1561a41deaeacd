"""Stage 1: RQ-VAE losses, the trainer, held-out reconstruction metrics, and encoding images into code datasets."""
