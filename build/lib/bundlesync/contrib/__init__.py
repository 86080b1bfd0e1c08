"""Plugins shipped with bundlesync for particular applications (loaded by the profiles that need them)."""
