"""Built-in training objectives a recipe's stage can name."""
