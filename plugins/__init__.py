"""Built-in plugins; each module listed in blipkit.plugin_manager.DEFAULT_PLUGINS is one plugin."""
