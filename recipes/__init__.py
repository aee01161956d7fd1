"""Recipes shipped with blipkit (YAML package data)."""
