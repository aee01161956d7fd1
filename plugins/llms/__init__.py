"""Built-in language model plugins."""
