"""Kolibri plugin: the lessons and quizzes assigned to a learner reach their single-user device.

Kolibri keeps lessons, quizzes and their assignments in the facility's bare dataset partition, outside
what a single-user (learner-only) device may read. So when a full-facility device syncs with a learner's
device, Kolibri derives per-learner copies in the learner's own read-only partition
(``lessons_individualsyncablelesson`` / ``exams_individualsyncableexam``: one row per lesson or quiz
assigned to the learner, with the lesson or quiz serialized in it), and the learner's device turns them
back into local lessons, quizzes and assignments. This plugin does the same over bundles:

- **export** for a single user (``export --user U`` from a full-facility device), SERIALIZING: bring U's
  copies in line with the lessons and quizzes currently assigned to U (active ones, through U's
  memberships; one copy per lesson or quiz, the classroom's assignment preferred over a group's): create,
  update, delete. They are written as ordinary local edits, so the export's own serialization carries them.
- **import** on a single-user device (its certificate is ``user:U``), CLEANUP (after the rows are written,
  in the import's last transaction): recreate, update or remove the local lessons, quizzes and assignments
  from U's copies. Those rows stay local: they are not tracked (a learner's device never sends them) and
  their Morango dirty bit is clear, as Kolibri does.

The copies' ids, partitions and serialized form are Kolibri's own (namespaced ids from the partition,
the lesson or quiz id and the model name), so copies made by Kolibri and by bundlesync are the same records.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bundlesync.hooks import FacilityDataSyncHook, register_hook
from bundlesync.operations import LocalOperation, SyncContext
from bundlesync.replica.tracking import suppressed

__all__ = ["KolibriSingleUserSyncHook", "Kind", "KINDS", "update_assignments_from_copies",
           "update_copies_from_assignments"]

_COLLECTION = "kolibriauth_collection"
_MEMBERSHIP = "kolibriauth_membership"
# Which assignment is a learner's canonical one when several collections assign the same lesson or quiz.
_PREFERENCE = "CASE c.kind WHEN 'classroom' THEN 1 WHEN 'learnergroup' THEN 2 WHEN 'adhoclearnersgroup' THEN 3 ELSE 4 END"


@dataclass(frozen=True)
class Kind:
    """Lessons or quizzes: the tables and columns involved."""

    name: str
    table: str  # lessons_lesson / exams_exam
    model: str  # Morango model name of table (for assignment ids)
    assignment: str  # …assignment table
    assignment_model: str
    copy: str  # …individualsyncable… table
    copy_model: str
    ref: str  # the copy's and assignment's column naming the lesson/quiz
    serialized: str  # the copy's column holding the serialized lesson/quiz
    active: str  # the lesson/quiz column saying it is visible to learners
    creator: str
    not_serialized: tuple[str, ...]  # device-local or recreated on the learner's side
    created_format: str  # how Kolibri writes date_created in SQLite


KINDS = (
    Kind("lesson", "lessons_lesson", "lesson", "lessons_lessonassignment", "lessonassignment",
         "lessons_individualsyncablelesson", "individualsyncablelesson", "lesson_id", "serialized_lesson",
         "is_active", "created_by_id", ("is_active", "created_by_id", "date_created"), "%Y-%m-%d %H:%M:%S.%f(UTC)"),
    Kind("quiz", "exams_exam", "exam", "exams_examassignment", "examassignment",
         "exams_individualsyncableexam", "individualsyncableexam", "exam_id", "serialized_exam",
         "active", "creator_id", ("active", "creator_id", "date_created", "date_activated"), "%Y-%m-%d %H:%M:%S.%f"),
)


def namespaced_id(partition: str, source_id: str, model: str) -> str:
    """Morango's id of a record: the first 32 hex digits of SHA-256 over ``partition::source::model``."""
    return hashlib.sha256(f"{partition}::{source_id}::{model}".encode("utf-8")).hexdigest()[:32]


def _columns(conn: sqlite3.Connection, table: str) -> dict[str, str]:
    """Column name -> declared type (lower case)."""
    return {str(r[1]): str(r[2] or "").lower() for r in conn.execute(f'PRAGMA table_info("{table}")')}


def _serialize(conn: sqlite3.Connection, kind: Kind, record_id: str) -> dict[str, Any]:
    """A lesson/quiz as Kolibri serializes it into a learner's copy (no dirty bit, booleans as JSON)."""
    types = _columns(conn, kind.table)
    cursor = conn.execute(f'SELECT * FROM "{kind.table}" WHERE id = ?', (record_id,))
    names = [d[0] for d in cursor.description]
    row = dict(zip(names, cursor.fetchone()))
    skip = {"_morango_dirty_bit", *kind.not_serialized}
    return {k: (bool(v) if types.get(k) == "bool" and v is not None else v) for k, v in row.items() if k not in skip}


def _canonical_assignments(conn: sqlite3.Connection, kind: Kind, user_id: str) -> dict[str, str]:
    """Lesson/quiz id -> the collection of the learner's canonical assignment of it (active ones only)."""
    rows = conn.execute(
        f'SELECT a."{kind.ref}", a.collection_id FROM "{kind.assignment}" AS a '
        f'JOIN "{_MEMBERSHIP}" AS m ON m.collection_id = a.collection_id AND m.user_id = ? '
        f'JOIN "{kind.table}" AS x ON x.id = a."{kind.ref}" AND x."{kind.active}" '
        f'JOIN "{_COLLECTION}" AS c ON c.id = a.collection_id '
        f'ORDER BY a."{kind.ref}", {_PREFERENCE}, a.collection_id', (user_id,)).fetchall()
    chosen: dict[str, str] = {}
    for ref, collection in rows:
        chosen.setdefault(str(ref), str(collection))
    return chosen


def update_copies_from_assignments(conn: sqlite3.Connection, kind: Kind, dataset_id: str, user_id: str) -> int:
    """Bring a learner's copies in line with what is assigned to them; returns how many rows changed.

    Writes are ordinary (tracked) edits of the copy table.
    """
    assigned = _canonical_assignments(conn, kind, user_id)
    copies = {str(r[0]): (str(r[1]), str(r[2]), r[3]) for r in conn.execute(
        f'SELECT "{kind.ref}", id, collection_id, "{kind.serialized}" FROM "{kind.copy}" WHERE user_id = ?',
        (user_id,))}
    partition = f"{dataset_id}:user-ro:{user_id}"
    changed = 0
    for ref, collection in assigned.items():
        data = _serialize(conn, kind, ref)
        text = json.dumps(data, ensure_ascii=False)
        if ref not in copies:
            conn.execute(
                f'INSERT INTO "{kind.copy}" (id, _morango_dirty_bit, _morango_source_id, _morango_partition, '
                f'"{kind.ref}", "{kind.serialized}", collection_id, dataset_id, user_id) '
                "VALUES (?, 1, ?, ?, ?, ?, ?, ?, ?)",
                (namespaced_id(partition, ref, kind.copy_model), ref, partition, ref, text, collection, dataset_id,
                 user_id))
            changed += 1
            continue
        copy_id, copy_collection, stored = copies[ref]
        if copy_collection != collection or _parsed(stored) != data:
            conn.execute(f'UPDATE "{kind.copy}" SET "{kind.serialized}" = ?, collection_id = ?, '
                         "_morango_dirty_bit = 1 WHERE id = ?", (text, collection, copy_id))
            changed += 1
    gone = [(copy_id,) for ref, (copy_id, _, _) in copies.items() if ref not in assigned]
    conn.executemany(f'DELETE FROM "{kind.copy}" WHERE id = ?', gone)
    return changed + len(gone)


def _parsed(text: object) -> Any:
    try:
        return json.loads(text) if isinstance(text, str) else text
    except ValueError:
        return None


def _classroom_of(conn: sqlite3.Connection, collection_id: str) -> str:
    """The collection itself if it is a classroom, else its parent (a group's classroom)."""
    row = conn.execute(f'SELECT kind, parent_id FROM "{_COLLECTION}" WHERE id = ?', (collection_id,)).fetchone()
    return collection_id if row is None or row[0] == "classroom" or row[1] is None else str(row[1])


def _write_record(conn: sqlite3.Connection, kind: Kind, data: Mapping[str, Any], copy_collection: str,
                  user_id: str, dataset_id: str) -> str:
    """Create or overwrite the local lesson/quiz a copy carries; returns its id."""
    types = _columns(conn, kind.table)
    row: dict[str, Any] = {k: v for k, v in data.items() if k in types}
    for key, value in row.items():
        if isinstance(value, (dict, list)):
            row[key] = json.dumps(value, ensure_ascii=False)  # a JSON field serialized as a value
    row[kind.active] = 1
    row[kind.creator] = user_id
    row["collection_id"] = row.get("collection_id") or _classroom_of(conn, copy_collection)
    row.setdefault("dataset_id", dataset_id)
    row.setdefault("_morango_partition", dataset_id)
    row.setdefault("_morango_source_id", row["id"])
    row["_morango_dirty_bit"] = 0
    if "date_created" in types:
        row.setdefault("date_created", datetime.datetime.now(datetime.timezone.utc).strftime(kind.created_format))
    names = list(row)
    updates = ", ".join(f'"{n}" = excluded."{n}"' for n in names if n not in ("id", "date_created"))
    conn.execute(f'INSERT INTO "{kind.table}" ({", ".join(chr(34) + n + chr(34) for n in names)}) '
                 f'VALUES ({", ".join("?" * len(names))}) ON CONFLICT (id) DO UPDATE SET {updates}',
                 [row[n] for n in names])
    return str(row["id"])


def update_assignments_from_copies(conn: sqlite3.Connection, kind: Kind, dataset_id: str, user_id: str) -> int:
    """On a learner's device: recreate, update or remove local lessons/quizzes and assignments from the copies.

    Returns how many assignments were created, changed or removed. The caller keeps these writes untracked.
    """
    copies = conn.execute(f'SELECT "{kind.ref}", collection_id, "{kind.serialized}" FROM "{kind.copy}" '
                          "WHERE user_id = ?", (user_id,)).fetchall()
    local = conn.execute(
        f'SELECT a.id, a."{kind.ref}", a.collection_id FROM "{kind.assignment}" AS a '
        f'JOIN "{_MEMBERSHIP}" AS m ON m.collection_id = a.collection_id AND m.user_id = ? '
        f'JOIN "{kind.table}" AS x ON x.id = a."{kind.ref}" AND x."{kind.active}"', (user_id,)).fetchall()
    by_ref: dict[str, list[tuple[str, str]]] = {}
    for assignment_id, ref, collection in local:
        by_ref.setdefault(str(ref), []).append((str(assignment_id), str(collection)))
    changed = 0
    wanted = set()
    for ref, collection, serialized in copies:
        ref, collection = str(ref), str(collection)
        wanted.add(ref)
        data = _parsed(serialized)
        if not isinstance(data, dict) or "id" not in data:
            continue  # not a serialized lesson/quiz; nothing to recreate
        data = {**data, "id": ref}
        mine = by_ref.get(ref)
        sent = {k: v for k, v in data.items() if k not in kind.not_serialized and k != "_morango_dirty_bit"}
        if mine and any(c == collection for _, c in mine) and _serialize(conn, kind, ref) == sent:
            continue  # already here as sent
        _write_record(conn, kind, data, collection, user_id, dataset_id)
        if mine:
            # Kolibri moves the existing assignment to the copy's collection.
            conn.execute(f'UPDATE "{kind.assignment}" SET collection_id = ?, _morango_dirty_bit = 0 WHERE id = ?',
                         (collection, mine[0][0]))
        else:
            source = f"{collection}:{ref}"
            conn.execute(
                f'INSERT INTO "{kind.assignment}" (id, _morango_dirty_bit, _morango_source_id, _morango_partition, '
                f'collection_id, dataset_id, "{kind.ref}", assigned_by_id) VALUES (?, 0, ?, ?, ?, ?, ?, ?) '
                "ON CONFLICT (id) DO UPDATE SET collection_id = excluded.collection_id",
                (namespaced_id(dataset_id, source, kind.assignment_model), source, dataset_id, collection,
                 dataset_id, ref, user_id))
        changed += 1
    gone = [(a,) for ref, items in by_ref.items() if ref not in wanted for a, _ in items]
    conn.executemany(f'DELETE FROM "{kind.assignment}" WHERE id = ?', gone)
    return changed + len(gone)


def _has_tables(conn: sqlite3.Connection, kind: Kind) -> bool:
    names = (kind.table, kind.assignment, kind.copy, _MEMBERSHIP, _COLLECTION)
    found = conn.execute(f"SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN "
                         f"({', '.join('?' * len(names))})", names).fetchone()[0]
    return bool(found == len(names))


def _single_user(scope: str | None) -> str | None:
    return scope.split(":", 1)[1] if scope and scope.startswith("user:") else None


class PrepareLearnerCopies(LocalOperation):
    """Export to a single-user device: refresh the learner's lesson and quiz copies before serialization."""

    def handle_initial(self, context: SyncContext) -> None:
        user = _single_user(context.remote_scope)
        if not context.is_export or user is None or _single_user(context.local_scope) or not context.dataset_id:
            return
        counts: dict[str, int] = {}
        for kind in KINDS:
            if _has_tables(context.connection, kind):
                counts[kind.name] = update_copies_from_assignments(context.connection, kind, context.dataset_id, user)
        context.extra["kolibri_learner_copies"] = counts


class RecreateLearnerAssignments(LocalOperation):
    """Import on a single-user device: lessons, quizzes and assignments from the learner's copies."""

    priority = 10

    def handle_initial(self, context: SyncContext) -> None:
        user = _single_user(context.local_scope)
        if context.is_export or user is None or not context.dataset_id:
            return
        counts: dict[str, int] = {}
        with suppressed(context.connection):  # local derivations: this device never sends them
            for kind in KINDS:
                if _has_tables(context.connection, kind):
                    counts[kind.name] = update_assignments_from_copies(context.connection, kind, context.dataset_id,
                                                                       user)
        context.extra["kolibri_learner_assignments"] = counts


@register_hook
class KolibriSingleUserSyncHook(FacilityDataSyncHook):
    """Kolibri's lessons and quizzes for single-user devices (see the module docstring)."""

    serializing_operations = [PrepareLearnerCopies()]
    cleanup_operations = [RecreateLearnerAssignments()]
