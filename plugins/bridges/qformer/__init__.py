"""The BLIP-2 Q-Former bridge."""
