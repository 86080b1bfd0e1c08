"""The one exception tree of bundlesync.

Every failure a user can cause or meet is a subclass of :class:`BundlesyncError`;
third-party exceptions (sqlite3, zstandard, cryptography, yaml, OS errors) are
translated at the module boundary that meets them, with ``raise ... from exc``.
The CLI prints ``str(error)`` as one line and exits with ``error.exit_code``.

    BundlesyncError
    ├── ConfigError            home, config.yaml, profile or database set-up is wrong
    │   └── ProfileError       the profile YAML does not describe the app DB
    ├── StateError             the device is not ready for the request (not initialised, no cert…)
    ├── BundleError            a bundle file cannot be trusted or read
    │   ├── FormatError        not a bundle, unknown version, truncated, trailing bytes, corrupt
    │   ├── IntegrityError     digest mismatch: the bytes changed after signing
    │   ├── ProfileMismatchError  written for another profile name/version
    │   └── TrustError         signature, certificate chain or scope is not acceptable
    ├── CertError              certificate request/grant files are wrong or do not match
    ├── PluginError            a plugin failed to load, or an operation failed during a sync
    └── SyncError              an export or import could not complete
"""

from __future__ import annotations

__all__ = [
    "BundleError",
    "BundlesyncError",
    "CertError",
    "ConfigError",
    "FormatError",
    "IntegrityError",
    "PluginError",
    "ProfileError",
    "ProfileMismatchError",
    "StateError",
    "SyncError",
    "TrustError",
]


class BundlesyncError(Exception):
    """Base of every error bundlesync raises on purpose.

    The message is one line: what happened, then what to do about it.
    """

    exit_code = 1


class ConfigError(BundlesyncError):
    """The home, its config.yaml, the profile or the app database is not usable."""

    exit_code = 2


class ProfileError(ConfigError):
    """The profile YAML is invalid or does not match the app database."""


class StateError(BundlesyncError):
    """The device is not in a state that allows the request (e.g. not initialised)."""

    exit_code = 3


class BundleError(BundlesyncError):
    """A bundle file cannot be read or trusted; nothing was written."""

    exit_code = 4


class FormatError(BundleError):
    """The file is not a bundle of a version we read, or it is truncated or corrupt."""


class IntegrityError(BundleError):
    """The bundle's bytes do not match the digest its signer signed."""


class ProfileMismatchError(BundleError):
    """The bundle was written for a different profile name or version."""


class TrustError(BundleError):
    """The bundle's signature, certificate chain or scope is not acceptable here."""

    exit_code = 5


class CertError(BundlesyncError):
    """A certificate request, grant or key file is wrong or does not match this device."""

    exit_code = 5


class PluginError(BundlesyncError):
    """A plugin could not be loaded, or one of its operations failed during a sync."""

    exit_code = 6


class SyncError(BundlesyncError):
    """An export or import could not be completed; the database is unchanged."""

    exit_code = 7
