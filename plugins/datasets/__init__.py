"""Built-in dataset format plugins."""
