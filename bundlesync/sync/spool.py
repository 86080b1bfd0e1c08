"""The record lines of the versions an export serializes, kept aside until the bundle is written.

Serializing a changed row encodes it (to hash it and to compare it with its stored version);
the bundle then needs the same encoding again. Rather than read every such row a second time
and encode it again when the bundle is written (a full export after ``init`` would do it for
every row), the export hands each batch of versions it serializes to a :class:`LineSpool`,
which makes their record lines at once and keeps them, compressed, in an unnamed temporary
file (nothing is left behind, even by a killed run). The queue then takes this export's own
versions from the spool and only the older ones from the store.

A spooled line is exactly the line the store would give for that version: the head is spelled
as SQLite's ``json_object`` spells it (:func:`~bundlesync.format.records.head_sql`; names of
plain characters are written here, others are asked of SQLite itself), and the data is the very
text the version's hash was computed from. The filter and the basis are applied as the queue
applies them to stored versions. A version replaced later in the same export (the app edited the
row between two of its transactions) is dropped, since the store keeps only the newer one.
"""

from __future__ import annotations

import collections
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

import msgspec
import zstandard

from bundlesync.errors import EnvError
from bundlesync.format.records import head_sql
from bundlesync.partitions import within
from bundlesync.replica import knowledge as kn
from bundlesync.replica.store import Write, stored_vector

__all__ = ["MAX_PENDING", "LineSpool"]

_LEVEL = 1
"""zstd level of the spool: it is read back once, minutes later at most; speed matters, not size."""

MAX_PENDING = 20_000
"""Versions added whose lines are not made yet, beyond which the export makes them after its next commit."""

_PLAIN = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_.:")

_HEAD_SQL = (f"SELECT CAST({head_sql('model', 'id', 'partition', 'inst')} AS BLOB) FROM (SELECT ? AS model, "
             "? AS id, ? AS partition, ? AS inst, ? AS hlc, ? AS wall, ? AS ctr, ? AS vv, ? AS deleted, ? AS purged)")
"""The head as the store's line query spells it (the same :func:`~bundlesync.format.records.head_sql`), from values."""

SqlValue = Callable[[str, Sequence[object]], bytes]
"""Runs one SELECT of one value with parameters and returns it."""


def _plain(text: str) -> bool:
    """Whether every JSON encoder spells ``text`` as itself between quotes (no escapes)."""
    return _PLAIN.issuperset(text)


class _Plain(dict[str, bool]):
    """:func:`_plain` of names that repeat (tables, partitions, writers), each worked out once."""

    def __missing__(self, text: str) -> bool:
        self[text] = answer = _plain(text)
        return answer


class LineSpool:
    """Record lines of one export's serialized versions, per table, compressed in a temporary file."""

    def __init__(self, folder: Path, *, instance: str, prefixes: Sequence[str],
                 basis: Mapping[str, Mapping[str, int]], sql_value: SqlValue) -> None:
        """``prefixes``: the export's filter; ``basis``: what the receiver holds, per prefix (as the queue uses them)."""
        self.instance, self.prefixes, self.basis = instance, tuple(prefixes), basis
        self._sql_value = sql_value
        # The basis can hold back a version of this export only where it claims that counter of this device.
        self._basis_mine = max((view.get(instance, 0) for view in basis.values()), default=0)
        self.folder = folder
        try:
            self._file: IO[bytes] = tempfile.TemporaryFile(dir=folder, prefix="bundlesync-spool-")
        except OSError as exc:
            raise self._failed(exc) from exc
        self._compress = zstandard.ZstdCompressor(level=_LEVEL).compress
        self._runs: dict[str, list[tuple[int, int, int]]] = {}  # model -> (file offset, size, lines) per batch
        self._replaced: dict[str, set[tuple[str, int]]] = {}
        self._versions: dict[str, int] = {}  # model -> versions serialized (spooled or not)
        self._pending: collections.deque[tuple[str, Sequence[Write], Sequence[tuple[str, int]]]] = collections.deque()
        self._pending_versions = 0
        self._inside: dict[str, bool] = {}
        self._given: set[str] = set()  # tables whose lines were read (a spool gives them once)
        self._plain = _Plain()
        self.first: int | None = None
        """The lowest counter spooled (this export's first serialization); None while nothing was."""

    def _wanted(self, partition: str, ctr: int) -> bool:
        inside = self._inside.get(partition)
        if inside is None:
            inside = self._inside[partition] = within(partition, self.prefixes)
        return inside and not (ctr <= self._basis_mine and kn.covers(self.basis, partition, self.instance, ctr))

    def _line(self, w: Write) -> bytes:
        model, record_id, partition, data, deleted, purged, hlc, inst, ctr, vv, _, _, wall, _ = w
        shown_wall = hlc >> 16 if wall is None else wall
        plain = self._plain
        if (plain[model] and plain[partition] and plain[inst] and all([plain[k] for k in vv])
                and type(record_id) is str and (record_id.isascii() and record_id.isalnum() or _plain(record_id))):
            # Nothing to escape: the head is the names and numbers in the field order of the store's SQL.
            vector = ",".join([f'"{k}":{v}' for k, v in sorted(vv.items())])
            return (f'{{"m":"{model}","id":"{record_id}","p":"{partition}","h":{hlc},"w":{shown_wall},'
                    f'"i":"{inst}","c":{ctr},"v":{{{vector}}},"f":{deleted + 2 * purged}}}\t{data}\n'
                    ).encode("utf-8", "surrogatepass")
        # A name JSON must escape: SQLite's own spelling, as the store's line query would give it.
        head = self._sql_value(_HEAD_SQL, (model, record_id, partition, inst, hlc, wall, ctr,
                                           stored_vector(vv, inst, ctr), deleted, purged))
        return b"%s\t%s\n" % (head, data.encode("utf-8", "surrogatepass"))

    def add(self, model: str, writes: Sequence[Write], replaced: Sequence[tuple[str, int]]) -> None:
        """One serialized batch of a table: its versions, and the versions of this device they replaced ``(id, ctr)``.

        Kept as it is until :meth:`work` (while the export rests between transactions, holding no lock)
        or :meth:`finish` makes the lines: making them never lengthens a write transaction.
        """
        self._pending.append((model, writes, replaced))
        self._pending_versions += len(writes)

    @property
    def pending(self) -> int:
        """Versions added whose lines are not made yet (the caller finishes them after a commit beyond
        :data:`MAX_PENDING`, when rests have been too short for them: memory stays bounded)."""
        return self._pending_versions

    def work(self, until: float) -> bool:
        """Make lines of the batches added until ``time.monotonic()`` reaches ``until`` (a pacer's ``meanwhile``).

        True if it worked until then; False if it ran out of batches first.
        """
        while self._pending:
            if time.monotonic() >= until:
                return True
            model, writes, replaced = self._pending.popleft()
            self._pending_versions -= len(writes)
            self._spool(model, writes, replaced)
        return False

    def finish(self) -> None:
        """Make the lines of every batch still waiting (before :meth:`lines`)."""
        self.work(float("inf"))

    def _spool(self, model: str, writes: Sequence[Write], replaced: Sequence[tuple[str, int]]) -> None:
        if replaced and self.first is not None:
            self._replaced.setdefault(model, set()).update((i, c) for i, c in replaced if c >= self.first)
        self._versions[model] = self._versions.get(model, 0) + len(writes)
        lines = []
        for w in writes:
            if self.first is None:
                self.first = w[8]
            if self._wanted(w[2], w[8]):
                lines.append(self._line(w))
        if lines:
            frame = self._compress(b"".join(lines))
            try:
                self._runs.setdefault(model, []).append((self._file.tell(), len(frame), len(lines)))
                self._file.write(frame)
            except OSError as exc:
                raise self._failed(exc) from exc

    def holds(self, model: str, stored: int) -> bool:
        """Whether the store's ``stored`` versions of this device from counter :attr:`first` on are exactly
        this export's (each spooled, or left out by filter or basis), so the spool can stand in for them.

        The count tells unless a version came from elsewhere: a database restored with its home from
        a backup can hold versions of its own writer above its counter (relayed back by a peer). The
        queue then reads that table from the store as usual; so it does once a table's lines were given.
        (Whatever writes versions takes a counter: the exporter drops the whole spool if anything took
        one after its serialization, so a count is enough here.)
        """
        return model not in self._given and stored == self._versions.get(model, 0) - len(self._replaced.get(model, ()))

    def lines(self, model: str) -> Iterator[list[bytes]]:
        """Batches of a table's spooled lines, in the order they were serialized (after :meth:`finish`).

        Each table's lines are given once: they leave the spool as they are read.
        """
        assert not self._pending, "finish() first"
        self._given.add(model)
        replaced = self._replaced.get(model)
        decompress = zstandard.ZstdDecompressor().decompress
        for position, size, count in self._runs.pop(model, []):
            try:
                self._file.seek(position)
                frame = self._file.read(size)
            except OSError as exc:
                raise self._failed(exc) from exc
            # Split at newlines only: a record line holds none but its last (JSON escapes the others).
            batch = [line + b"\n" for line in decompress(frame).split(b"\n")[:-1]]
            if len(batch) != count:
                raise EnvError(f"the export's record lines kept in {self.folder} read back {len(batch)} lines instead "
                               f"of {count}: check that disk, then export again")
            if replaced:
                batch = [line for line in batch if _key(line) not in replaced]
            if batch:
                yield batch

    def close(self) -> None:
        self._file.close()

    def _failed(self, exc: OSError) -> EnvError:
        return EnvError(f"cannot keep the export's record lines in {self.folder} ({exc.strerror or exc}): "
                        "free space on the disk that holds bundlesync's home, then export again")


def _key(line: bytes) -> tuple[str, int]:
    """``(id, counter)`` of a spooled line."""
    head = msgspec.json.decode(line[: line.index(b"\t")])
    return str(head["id"]), int(head["c"])
