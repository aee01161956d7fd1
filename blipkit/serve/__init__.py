"""The HTTP API over a loaded model (``blipkit serve``; needs the ``serve`` extra)."""
