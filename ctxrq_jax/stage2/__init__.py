"""Stage 2: masks and the masked code-stack objective (eq. 10-11), and the Contextual RQ-Transformer trainer."""
