"""Draft-and-Revise decoding (§3.3, Algorithms 1-2): partitions, per-phase logit settings, the jitted fori_loop
decoder, its plain reference (a test oracle), the params-only loader of a trained run, and the batched runner."""
