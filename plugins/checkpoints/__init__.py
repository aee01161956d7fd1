"""Built-in checkpoint loaders: models that are not blipkit run directories."""
