"""The one exception tree of bundlesync.

Every failure a user can cause or meet is a subclass of :class:`BundlesyncError`;
third-party exceptions (sqlite3, zstandard, cryptography, yaml, OS errors) are
translated at the module boundary that meets them, with ``raise ... from exc``.
The CLI prints ``str(error)`` as one line and exits with ``error.exit_code``.

    BundlesyncError                 exit 1
    ├── ConfigError                 exit 2  home, config.yaml, profile or database set-up is wrong
    │   └── ProfileError                    the profile YAML does not describe the app DB
    ├── StateError                  exit 3  the device is not ready (not initialised, no cert, no key…)
    ├── BundleError                 exit 4  a bundle file cannot be read
    │   ├── FormatError                     not a bundle, unknown version, truncated, trailing bytes, corrupt
    │   ├── IntegrityError                  digest mismatch: the bytes changed after signing
    │   └── ProfileMismatchError            written for another profile name/version
    ├── ReceiptError                exit 4  a receipt file on a drive cannot be read
    ├── TrustError                  exit 5  a signature, certificate chain or scope is not acceptable
    ├── CertError                   exit 5  certificate request/grant/key files are wrong or do not match
    ├── PluginError                 exit 6  a plugin failed to load, or an operation failed during a sync
    ├── SyncError                   exit 7  an export or import could not complete
    └── EnvError                    exit 8  the environment stops the run
        ├── DriveError                      output drive missing, not mounted, full or unwritable
        └── BusyError                       database or home held by another program or run

Exit 9 (:data:`EXIT_PARTIAL`) is not an exception: an import that applied, but not everything
(records refused, rows waiting for their parents, gaps in history), reports it.
"""

from __future__ import annotations

__all__ = [
    "EXIT_PARTIAL",
    "BundleError",
    "BusyError",
    "BundlesyncError",
    "CertError",
    "ConfigError",
    "DriveError",
    "EnvError",
    "FormatError",
    "IntegrityError",
    "PluginError",
    "ProfileError",
    "ProfileMismatchError",
    "ReceiptError",
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


class ReceiptError(BundlesyncError):
    """A receipt file cannot be read (not a receipt, damaged, unreadable)."""

    exit_code = 4


class TrustError(BundlesyncError):
    """A signature, certificate chain or scope (of a bundle, receipt or certificate) is not acceptable here."""

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


class EnvError(BundlesyncError):
    """The environment stops the run: a drive or the database is not usable right now."""

    exit_code = 8


class DriveError(EnvError):
    """The output folder is missing, not on a mounted drive, full or not writable."""


class BusyError(EnvError):
    """The database or the home is held by another program or another bundlesync run."""


EXIT_PARTIAL = 9
"""Exit code of an import that applied, but not everything (refused, waiting, gaps)."""
