"""Profiles shipped with bundlesync, one ``NAME.yaml`` each; ``bundlesync init --profile NAME`` uses one by name."""
