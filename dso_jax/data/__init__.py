"""Training data: DSO-style (condition, stable latent, unstable latent) pairs."""
