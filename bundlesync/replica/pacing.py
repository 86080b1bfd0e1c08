"""Sharing the app database's write lock with the app while bundlesync writes a lot.

SQLite has one write lock per database and no queue for it. A program that finds it
taken sleeps in its busy handler and tries again: SQLite's default handler, which
Python's ``sqlite3.connect(timeout=…)`` installs, retries after 1, 2, 5, 10, 15, 20, 25,
25, 25, 50 and 50 ms, then every 100 ms, and fails with "database is locked" when its
timeout (5 s by default in Python, and in Kolibri's server) runs out.

So an import or export that writes a lot does it in short write transactions
(:data:`HOLD_S` of work each), and between two of them it may *rest*, so that a writer
that is waiting gets the lock. Without rests, bundlesync would take the lock again the
moment it let go, and a waiting app could lose every retry until its timeout. Resting
after every transaction for longer than the handler's longest sleep would halve the
speed of a sync, so the rests follow what is seen of the app (``PRAGMA data_version``
changes when another connection commits):

- while the app is seen writing (it committed since bundlesync's last commit), bundlesync
  rests after each transaction until it sees the app commit again — its waiting writer got
  the lock — or for :data:`REST_S` at most (then nobody was waiting);
- whatever is seen, it rests the whole :data:`REST_S`, longer than the busy handler's
  longest sleep, once per :data:`BURST_S` of held lock: every writer that waits, however
  long it has waited and however many others wait with it, retries within that rest.

So an app writer's longest wait is about ``BURST_S + HOLD_S + REST_S`` (a writer that
starts in the middle of a sync, or one of several that wait together), and about
``HOLD_S`` plus one busy-handler sleep while the app keeps writing.

While the app is quiet (no commit of another connection seen for :data:`QUIET_S`), a burst
is one transaction instead of several back to back: a waiting writer could not get the lock
between those anyway (bundlesync takes it again at once), so its longest wait stays the
same, and each commit saved is a journal sync saved (~15 ms on this project's test machine,
with a transaction of 100 ms). The first commit of the app seen brings the short
transactions back. A caller that passes ``between`` gets short transactions throughout: it
means to act between them.

A rest need not be idle: the caller may hand the pacer work that needs no database
(``meanwhile``, e.g. parsing the next record lines of an import), done while it rests
instead of sleeping. The rest lasts as long either way (up to one small piece of work
more): what matters to the app is that bundlesync holds no lock meanwhile.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator

from bundlesync.replica.db import write_transaction

__all__ = ["BURST_S", "HOLD_S", "Meanwhile", "Over", "PEEK_S", "QUIET_S", "REST_S", "Pacer"]

HOLD_S = 0.1
"""How long one short write transaction keeps taking work before it commits."""

REST_S = 0.12
"""The longest rest: above the busy handler's 100 ms sleeps, so every waiting writer retries within it."""

BURST_S = 0.5
"""The most write-lock time between two full rests."""

PEEK_S = 0.004
"""How often a rest looks whether the app has committed."""

QUIET_S = 3.0
"""No commit of another connection seen for this long: the app counts as quiet (a burst is one transaction)."""

Over = Callable[[], bool]
"""Says whether the current transaction has had its share of time."""

Meanwhile = Callable[[float], bool]
"""Work needing no database, done during rests: given a deadline (``time.monotonic()``), it works in
small pieces until then and says True; False if it ran out of work first (the pacer sleeps the rest)."""


class Pacer:
    """Hands out short write transactions on one connection, resting between them (see the module docstring)."""

    def __init__(self, conn: sqlite3.Connection, *, hold: float = HOLD_S, rest: float = REST_S,
                 burst: float = BURST_S, quiet: float | None = QUIET_S,
                 between: Callable[[], None] | None = None) -> None:
        """``between`` is called after every commit, while this connection holds no lock.

        ``quiet``: see :data:`QUIET_S`; None keeps every transaction short (so does ``between``).
        """
        self.conn, self.hold, self.rest, self.burst, self.between = conn, hold, rest, burst, between
        self.quiet = None if between is not None else quiet
        self.transactions = 0
        self.rested = 0.0
        """Seconds spent resting so far."""
        self.meanwhile: Meanwhile | None = None
        """Work to do while resting instead of sleeping (set and cleared by the caller)."""
        self._held = 0.0  # write-lock time since the last full rest
        self._version = self._data_version()
        self._others_wrote = False
        self._app_seen = -float("inf")  # when another connection's commit was last seen (time.monotonic())

    def _data_version(self) -> int:
        return int(self.conn.execute("PRAGMA data_version").fetchone()[0])

    def _rest_if_due(self) -> None:
        if not self.transactions:
            return
        start = time.monotonic()
        if self._held >= self.burst:
            self._pause(start + self.rest)
            self._held = 0.0
        elif self._others_wrote:
            # The app is writing: rest until its waiting writer has had the lock (its commit shows).
            while time.monotonic() - start < self.rest:
                self._pause(time.monotonic() + PEEK_S)
                if self._data_version() != self._version:
                    break
        self.rested += time.monotonic() - start

    def _pause(self, until: float) -> None:
        """Hold no lock until ``until``: do the caller's work meanwhile if it has some, else sleep."""
        if self.meanwhile is not None and self.meanwhile(until):
            return
        left = until - time.monotonic()
        if left > 0:
            time.sleep(left)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Over]:
        """One short write transaction (``BEGIN IMMEDIATE`` … ``COMMIT``); yields its "time is up" test.

        The caller does work in small steps and stops when the test says so; the
        transaction commits at the end of the ``with`` block (or rolls back on an exception).
        """
        self._rest_if_due()
        with write_transaction(self.conn):
            # Another program committed since this one's last transaction began (no one else can commit
            # while it holds the write lock, so: since its last commit, while it rested or waited).
            version = self._data_version()
            self._others_wrote, self._version = version != self._version, version
            start = time.monotonic()
            if self._others_wrote:
                self._app_seen = start
            share = self.hold
            if self.quiet is not None and start - self._app_seen >= self.quiet:
                share = max(self.hold, self.burst - self._held)  # the app is quiet: the burst in one transaction
            deadline = start + share
            yield lambda: time.monotonic() >= deadline
        self._held += time.monotonic() - start
        self.transactions += 1
        if self.between is not None:
            self.between()
