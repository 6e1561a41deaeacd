"""Models: the residual quantizer (rq), the RQ-VAE and its artifact on disk, the PatchGAN discriminator, the
Contextual RQ-Transformer, the digit judge, and the converter from the released PyTorch RQ-VAE."""
