"""Data: dataset formats glue, image loading, collation."""
