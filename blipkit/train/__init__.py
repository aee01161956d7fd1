"""Training: the recipe runner."""
