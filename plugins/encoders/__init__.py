"""Built-in image encoder plugins."""
