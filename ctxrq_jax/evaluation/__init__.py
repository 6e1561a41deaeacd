"""Evaluation: held-out likelihood of stage 2, the digit judge of the demo samples, and speed benchmarks."""
