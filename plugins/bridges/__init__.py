"""Built-in bridge and projection plugins."""
