"""The plugin API: hook classes, stage operations and their context, and plugin loading.
Plugins import it as ``bundlesync.hooks`` and ``bundlesync.operations``."""
