"""The version of bundlesync (one place: the package, the CLI and bundle manifests read it)."""

__version__ = "0.1.0"
