"""The assembled model (encoder, bridge, projection, LLM): building it, LoRA, saving and loading."""
