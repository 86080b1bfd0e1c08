#!/usr/bin/env python3
"""Write a deterministic, Kolibri-like facility database for tests and benchmarks.

``make_facility_db.py OUT.sqlite3 [--users N] [--logs M] [--seed S] [--schema-only] [--force]``
prints only the facility id (the ``kolibriauth_collection`` row of kind ``facility``) on
stdout. ``--schema-only`` writes the empty schema: a device that has not received the
facility yet. The same seed always yields byte-for-byte the same rows.

Row counts for ``--users N`` (N >= 1) and ``--logs M`` (M >= 0), with ``C = max(1, N // 15)``
classrooms and ``S = max(1, N // 10)`` staff (one admin, ``S - 1`` coaches), ``L = N - S``
learners:

=============================  ======================================================
table                          rows
=============================  ======================================================
kolibriauth_facilitydataset    1
kolibriauth_collection         1 + 3C (facility, C classrooms, 2 learner groups each)
kolibriauth_facilityuser       N
kolibriauth_membership         2L (each learner: one classroom, one of its groups)
kolibriauth_role               S (admin on the facility; coach k on classroom k mod C)
lessons_lesson                 2C
lessons_lessonassignment       2C
exams_exam                     C
exams_examassignment           C
logger_examlog                 E = M // 40
logger_examattemptlog          E
logger_contentsummarylog       M // 5
logger_masterylog              M // 10
logger_attemptlog              7M // 20
logger_contentsessionlog       M - (the five logger counts above)  (about 30%)
=============================  ======================================================

So the six logger tables hold exactly M rows. About 3% of session logs are anonymous
(NULL ``user_id``); their attempt logs are anonymous too (NULL ``user_id`` and
``masterylog_id``). Logs belong to learners (to all users when there are no learners).

Importable: ``create_schema(conn)`` and ``populate(conn, users, logs, seed)``.
Standard library only, so it runs before the package is installed.
"""

from __future__ import annotations

import argparse
import random
import re
import sqlite3
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from itertools import islice
from pathlib import Path
from typing import TypeVar

__all__ = ["SCHEMA", "TABLES", "create_schema", "log_counts", "main", "populate"]

SCHEMA = """
CREATE TABLE kolibriauth_facilitydataset (
    id TEXT NOT NULL PRIMARY KEY, description TEXT NOT NULL, location TEXT NOT NULL,
    preset TEXT NOT NULL, learner_can_edit_username INTEGER NOT NULL,
    learner_can_edit_name INTEGER NOT NULL, learner_can_edit_password INTEGER NOT NULL,
    learner_can_sign_up INTEGER NOT NULL, learner_can_delete_account INTEGER NOT NULL,
    learner_can_login_with_no_password INTEGER NOT NULL,
    show_download_button_in_learn INTEGER NOT NULL, allow_guest_access INTEGER NOT NULL,
    registered INTEGER NOT NULL, extra_fields TEXT, dataset_id TEXT NOT NULL
);
CREATE TABLE kolibriauth_collection (
    id TEXT NOT NULL PRIMARY KEY, name TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('facility', 'classroom', 'learnergroup')),
    parent_id TEXT REFERENCES kolibriauth_collection(id), date_created TEXT,
    extra_fields TEXT, dataset_id TEXT NOT NULL REFERENCES kolibriauth_facilitydataset(id)
);
CREATE TABLE kolibriauth_facilityuser (
    id TEXT NOT NULL PRIMARY KEY, username TEXT NOT NULL, full_name TEXT NOT NULL,
    password TEXT NOT NULL, date_joined TEXT NOT NULL, last_login TEXT, birth_year TEXT,
    gender TEXT, id_number TEXT, facility_id TEXT NOT NULL REFERENCES kolibriauth_collection(id),
    extra_fields TEXT, dataset_id TEXT NOT NULL REFERENCES kolibriauth_facilitydataset(id),
    UNIQUE (username, facility_id)
);
CREATE TABLE kolibriauth_membership (
    id TEXT NOT NULL PRIMARY KEY, user_id TEXT NOT NULL REFERENCES kolibriauth_facilityuser(id),
    collection_id TEXT NOT NULL REFERENCES kolibriauth_collection(id),
    dataset_id TEXT NOT NULL REFERENCES kolibriauth_facilitydataset(id)
);
CREATE TABLE kolibriauth_role (
    id TEXT NOT NULL PRIMARY KEY, user_id TEXT NOT NULL REFERENCES kolibriauth_facilityuser(id),
    collection_id TEXT NOT NULL REFERENCES kolibriauth_collection(id),
    kind TEXT NOT NULL CHECK (kind IN ('coach', 'admin')),
    dataset_id TEXT NOT NULL REFERENCES kolibriauth_facilitydataset(id)
);
CREATE TABLE lessons_lesson (
    id TEXT NOT NULL PRIMARY KEY, title TEXT NOT NULL, description TEXT NOT NULL,
    resources TEXT NOT NULL, is_active INTEGER NOT NULL,
    collection_id TEXT NOT NULL REFERENCES kolibriauth_collection(id),
    created_by_id TEXT REFERENCES kolibriauth_facilityuser(id), date_created TEXT NOT NULL,
    dataset_id TEXT NOT NULL REFERENCES kolibriauth_facilitydataset(id)
);
CREATE TABLE lessons_lessonassignment (
    id TEXT NOT NULL PRIMARY KEY, lesson_id TEXT NOT NULL REFERENCES lessons_lesson(id),
    collection_id TEXT NOT NULL REFERENCES kolibriauth_collection(id),
    assigned_by_id TEXT REFERENCES kolibriauth_facilityuser(id),
    dataset_id TEXT NOT NULL REFERENCES kolibriauth_facilitydataset(id)
);
CREATE TABLE exams_exam (
    id TEXT NOT NULL PRIMARY KEY, title TEXT NOT NULL, question_count INTEGER NOT NULL,
    question_sources TEXT NOT NULL, active INTEGER NOT NULL,
    collection_id TEXT NOT NULL REFERENCES kolibriauth_collection(id),
    creator_id TEXT REFERENCES kolibriauth_facilityuser(id), date_created TEXT NOT NULL,
    dataset_id TEXT NOT NULL REFERENCES kolibriauth_facilitydataset(id)
);
CREATE TABLE exams_examassignment (
    id TEXT NOT NULL PRIMARY KEY, exam_id TEXT NOT NULL REFERENCES exams_exam(id),
    collection_id TEXT NOT NULL REFERENCES kolibriauth_collection(id),
    assigned_by_id TEXT REFERENCES kolibriauth_facilityuser(id),
    dataset_id TEXT NOT NULL REFERENCES kolibriauth_facilitydataset(id)
);
CREATE TABLE logger_contentsessionlog (
    id TEXT NOT NULL PRIMARY KEY, user_id TEXT REFERENCES kolibriauth_facilityuser(id),
    content_id TEXT NOT NULL, channel_id TEXT NOT NULL, start_timestamp TEXT NOT NULL,
    end_timestamp TEXT NOT NULL, time_spent REAL NOT NULL, progress REAL NOT NULL,
    kind TEXT NOT NULL, extra_fields TEXT,
    dataset_id TEXT NOT NULL REFERENCES kolibriauth_facilitydataset(id)
);
CREATE TABLE logger_contentsummarylog (
    id TEXT NOT NULL PRIMARY KEY, user_id TEXT NOT NULL REFERENCES kolibriauth_facilityuser(id),
    content_id TEXT NOT NULL, channel_id TEXT NOT NULL, start_timestamp TEXT NOT NULL,
    end_timestamp TEXT NOT NULL, completion_timestamp TEXT, time_spent REAL NOT NULL,
    progress REAL NOT NULL, kind TEXT NOT NULL, extra_fields TEXT,
    dataset_id TEXT NOT NULL REFERENCES kolibriauth_facilitydataset(id)
);
CREATE TABLE logger_masterylog (
    id TEXT NOT NULL PRIMARY KEY, user_id TEXT NOT NULL REFERENCES kolibriauth_facilityuser(id),
    summarylog_id TEXT NOT NULL REFERENCES logger_contentsummarylog(id),
    mastery_level INTEGER NOT NULL, complete INTEGER NOT NULL, start_timestamp TEXT NOT NULL,
    end_timestamp TEXT, mastery_criterion TEXT NOT NULL,
    dataset_id TEXT NOT NULL REFERENCES kolibriauth_facilitydataset(id)
);
CREATE TABLE logger_attemptlog (
    id TEXT NOT NULL PRIMARY KEY, user_id TEXT REFERENCES kolibriauth_facilityuser(id),
    masterylog_id TEXT REFERENCES logger_masterylog(id),
    sessionlog_id TEXT NOT NULL REFERENCES logger_contentsessionlog(id), item TEXT NOT NULL,
    correct REAL NOT NULL, answer TEXT, time_spent REAL NOT NULL, start_timestamp TEXT NOT NULL,
    end_timestamp TEXT NOT NULL,
    dataset_id TEXT NOT NULL REFERENCES kolibriauth_facilitydataset(id)
);
CREATE TABLE logger_examlog (
    id TEXT NOT NULL PRIMARY KEY, exam_id TEXT NOT NULL REFERENCES exams_exam(id),
    user_id TEXT NOT NULL REFERENCES kolibriauth_facilityuser(id), closed INTEGER NOT NULL,
    completion_timestamp TEXT, dataset_id TEXT NOT NULL REFERENCES kolibriauth_facilitydataset(id)
);
CREATE TABLE logger_examattemptlog (
    id TEXT NOT NULL PRIMARY KEY, examlog_id TEXT NOT NULL REFERENCES logger_examlog(id),
    user_id TEXT NOT NULL REFERENCES kolibriauth_facilityuser(id), item TEXT NOT NULL,
    correct REAL NOT NULL, answer TEXT,
    dataset_id TEXT NOT NULL REFERENCES kolibriauth_facilitydataset(id)
);
"""

# Parents come before children in this order.
TABLES: tuple[str, ...] = tuple(re.findall(r"CREATE TABLE (\w+)", SCHEMA))

# Every timestamp is BASE plus an rng offset, so output never depends on the clock.
_BASE = datetime(2026, 1, 5, 8, 0, 0)
_SPAN_SECONDS = 120 * 86400.0
_BATCH = 20_000
_Row = tuple[object, ...]
_T = TypeVar("_T")

_FIRST = ("José", "Łukasz", "学生", "Amina", "Chloé", "Søren", "Nguyễn", "Kwame", "Zoë",
          "Ömer", "Priya", "Иван", "Fatima", "Mateo", "D'Arcy", "Aiyana")
_LAST = ("Nuñez", "Kowalski", "王", "Müller", "O'Connor", "Mbeki", "Дмитриев", "Østergaard",
         "García", "Tanaka", "Ndlovu", "Smith", "Nakamura", "Ibrahim")
_GENDERS = ("FEMALE", "MALE", "NOT_SPECIFIED", None)
_KINDS = ("video", "exercise", "document", "audio", "html5")
_DEVICES = ("tablet", "laptop", "phone")


def create_schema(conn: sqlite3.Connection) -> None:
    """Create every table of the facility schema in an empty database.

    Args:
        conn: An open connection to the target database.
    """
    conn.executescript(SCHEMA)


def log_counts(logs: int) -> dict[str, int]:
    """Split ``logs`` rows over the six logger tables; the values sum to ``logs``.

    Args:
        logs: Total number of logger rows wanted (>= 0).

    Returns:
        Row count per logger table name.
    """
    if logs < 0:
        raise ValueError("logs must be >= 0")
    counts = {"logger_contentsummarylog": logs // 5, "logger_masterylog": logs // 10,
              "logger_attemptlog": 7 * logs // 20, "logger_examlog": logs // 40,
              "logger_examattemptlog": logs // 40}
    # The floors leave at least 30% for sessions, so every child count has parents to use.
    counts["logger_contentsessionlog"] = logs - sum(counts.values())
    return counts


def _insert(conn: sqlite3.Connection, table: str, width: int, rows: Iterable[_Row]) -> None:
    sql = f"INSERT INTO {table} VALUES ({', '.join('?' * width)})"
    # Batches bound memory at a million rows while keeping executemany's speed.
    source = iter(rows)
    while batch := list(islice(source, _BATCH)):
        conn.executemany(sql, batch)


def populate(conn: sqlite3.Connection, users: int, logs: int, seed: int) -> str:
    """Fill an empty facility schema with one deterministic facility.

    Commits at the end. See the module docstring for the row counts.

    Args:
        conn: Connection to a database created with :func:`create_schema`.
        users: Number of facility users (>= 1).
        logs: Total number of logger rows (>= 0).
        seed: Seed of the random generator; equal seeds give equal databases.

    Returns:
        The facility id (the collection row of kind ``facility``).
    """
    if users < 1:
        raise ValueError("users must be >= 1: a facility needs at least its admin")
    rng = random.Random(seed)
    bits = rng.getrandbits
    rand = rng.random

    def uid() -> str:
        return f"{bits(128):032x}"

    def stamp(offset: float) -> str:
        return (_BASE + timedelta(seconds=offset)).isoformat(" ", "microseconds")

    def when() -> float:
        return rand() * _SPAN_SECONDS

    def pick(seq: Sequence[_T]) -> _T:
        return seq[int(rand() * len(seq))]

    dataset = uid()
    facility = uid()
    conn.execute(
        "INSERT INTO kolibriauth_facilitydataset VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (dataset, "Escuela Río Ñuble — facility", "Łódź / 学校", "formal", 0, 1, 0, 0, 1, 0,
         1, 0, 0, '{"on_my_own_setup": false, "pin_code": null}', dataset),
    )
    classrooms = [uid() for _ in range(max(1, users // 15))]
    groups = [(uid(), c) for c in classrooms for _ in range(2)]
    collections: list[_Row] = [
        (facility, "Escuela Río Ñuble", "facility", None, stamp(0.0), None, dataset)]
    collections += [(c, f"Clase {i + 1} — «año {i % 6 + 1}»", "classroom", facility,
                     stamp(when()), '{"color": "blue"}', dataset)
                    for i, c in enumerate(classrooms)]
    collections += [(g, f"Grupo {i % 2 + 1}", "learnergroup", c, stamp(when()), None, dataset)
                    for i, (g, c) in enumerate(groups)]
    _insert(conn, "kolibriauth_collection", 7, collections)

    staff = max(1, users // 10)
    user_ids = [uid() for _ in range(users)]
    rows: list[_Row] = []
    for i, user in enumerate(user_ids):
        role = "admin" if i == 0 else ("coach" if i < staff else "learner")
        joined = when()
        rows.append((
            user, f"{role}{i:05d}", f"{pick(_FIRST)} {pick(_LAST)}",
            f"pbkdf2_sha256$36000${bits(48):012x}${bits(256):064x}=",
            stamp(joined), None if rand() < 0.2 else stamp(joined + when() / 4),
            None if rand() < 0.15 else str(1990 + int(rand() * 25)),
            _GENDERS[int(rand() * 4)], None if rand() < 0.5 else f"ID-{bits(24):06x}",
            facility, None if rand() < 0.3 else f'{{"grade": {int(rand() * 12) + 1}}}',
            dataset))
    _insert(conn, "kolibriauth_facilityuser", 12, rows)

    learners = user_ids[staff:]
    group_of: dict[str, list[str]] = {c: [] for c in classrooms}
    for g, c in groups:
        group_of[c].append(g)
    rows = []
    for learner in learners:
        room = pick(classrooms)
        rows.append((uid(), learner, room, dataset))
        rows.append((uid(), learner, pick(group_of[room]), dataset))
    _insert(conn, "kolibriauth_membership", 4, rows)
    rows = [(uid(), user_ids[0], facility, "admin", dataset)]
    rows += [(uid(), user_ids[k], classrooms[k % len(classrooms)], "coach", dataset)
             for k in range(1, staff)]
    _insert(conn, "kolibriauth_role", 5, rows)

    def author() -> str | None:
        return None if rand() < 0.25 else user_ids[int(rand() * staff)]

    channels = [uid() for _ in range(10)]
    content = [(uid(), channels[k % 10], _KINDS[k % 5]) for k in range(300)]
    lessons: list[_Row] = []
    lesson_assign: list[_Row] = []
    exams: list[_Row] = []
    exam_assign: list[_Row] = []
    for c in classrooms:
        for n in range(2):
            lesson = uid()
            res = ", ".join(f'{{"contentnode_id": "{pick(content)[0]}"}}' for _ in range(3))
            lessons.append((lesson, f"Lección {n + 1}: fracciones ½ & ¼", "Repaso 'básico'",
                            f"[{res}]", int(rand() < 0.8), c, author(), stamp(when()), dataset))
            target = c if n == 0 else pick(group_of[c])
            lesson_assign.append((uid(), lesson, target, author(), dataset))
        exam = uid()
        exams.append((exam, "Quiz — 测验 1", 10,
                       f'[{{"exercise_id": "{pick(content)[0]}", "question_id": "q1"}}]',
                       int(rand() < 0.5), c, author(), stamp(when()), dataset))
        exam_assign.append((uid(), exam, c, author(), dataset))
    _insert(conn, "lessons_lesson", 9, lessons)
    _insert(conn, "lessons_lessonassignment", 5, lesson_assign)
    _insert(conn, "exams_exam", 9, exams)
    _insert(conn, "exams_examassignment", 5, exam_assign)

    _populate_logs(conn, rng, uid, stamp, dataset, learners or user_ids,
                   [str(e[0]) for e in exams], content, log_counts(logs))
    conn.commit()
    return facility


def _populate_logs(conn: sqlite3.Connection, rng: random.Random, uid: Callable[[], str],
                   stamp: Callable[[float], str], dataset: str, log_users: list[str],
                   exam_ids: list[str], content: list[tuple[str, str, str]],
                   counts: dict[str, int]) -> None:
    """Insert the six logger tables, parents first, keeping only the ids children need."""
    rand = rng.random
    bits = rng.getrandbits
    n_users = len(log_users)
    n_content = len(content)

    session_ids: list[str] = []
    session_users: list[str | None] = []

    def sessions() -> Iterator[_Row]:
        for _ in range(counts["logger_contentsessionlog"]):
            sid = uid()
            user = None if rand() < 0.03 else log_users[int(rand() * n_users)]
            session_ids.append(sid)
            session_users.append(user)
            cid, chan, kind = content[int(rand() * n_content)]
            start = rand() * _SPAN_SECONDS
            spent = rand() * 600
            yield (sid, user, cid, chan, stamp(start), stamp(start + spent), spent, rand(),
                   kind, f'{{"device": "{_DEVICES[int(rand() * 3)]}", "tab": {bits(8)}}}',
                   dataset)

    _insert(conn, "logger_contentsessionlog", 11, sessions())

    summary_ids: list[str] = []
    summary_users: list[str] = []

    def summaries() -> Iterator[_Row]:
        for _ in range(counts["logger_contentsummarylog"]):
            sid = uid()
            user = log_users[int(rand() * n_users)]
            summary_ids.append(sid)
            summary_users.append(user)
            cid, chan, kind = content[int(rand() * n_content)]
            start = rand() * _SPAN_SECONDS
            spent = rand() * 3600
            done = rand() < 0.4
            yield (sid, user, cid, chan, stamp(start), stamp(start + spent),
                   stamp(start + spent) if done else None, spent,
                   1.0 if done else rand(), kind,
                   None if rand() < 0.5 else f'{{"statement_id": "{bits(64):016x}"}}', dataset)

    _insert(conn, "logger_contentsummarylog", 12, summaries())

    mastery_by_user: dict[str, list[str]] = {}
    n_summaries = len(summary_ids)

    def masteries() -> Iterator[_Row]:
        for _ in range(counts["logger_masterylog"]):
            mid = uid()
            k = int(rand() * n_summaries)
            user = summary_users[k]
            mastery_by_user.setdefault(user, []).append(mid)
            start = rand() * _SPAN_SECONDS
            complete = rand() < 0.5
            m = 3 + int(rand() * 3)
            yield (mid, user, summary_ids[k], 1 + int(rand() * 10), int(complete),
                   stamp(start), stamp(start + rand() * 900) if complete else None,
                   f'{{"type": "m_of_n", "m": {m}, "n": {m + 2}}}', dataset)

    _insert(conn, "logger_masterylog", 9, masteries())
    del summary_ids, summary_users

    n_sessions = len(session_ids)
    no_mastery: list[str] = []

    def attempts() -> Iterator[_Row]:
        for _ in range(counts["logger_attemptlog"]):
            k = int(rand() * n_sessions)
            user = session_users[k]
            options = mastery_by_user.get(user, no_mastery) if user is not None else no_mastery
            mastery = options[int(rand() * len(options))] if options else None
            start = rand() * _SPAN_SECONDS
            spent = rand() * 120
            correct = rand()
            yield (uid(), user, mastery, session_ids[k], f"{bits(64):016x}:{bits(4)}",
                   correct, None if rand() < 0.05 else
                   f'{{"response": "{bits(16)}", "correct": {str(correct > 0.5).lower()}}}',
                   spent, stamp(start), stamp(start + spent), dataset)

    _insert(conn, "logger_attemptlog", 11, attempts())
    del session_ids, session_users, mastery_by_user

    examlogs: list[tuple[str, str]] = []

    def exam_logs() -> Iterator[_Row]:
        for _ in range(counts["logger_examlog"]):
            eid = uid()
            user = log_users[int(rand() * n_users)]
            examlogs.append((eid, user))
            closed = rand() < 0.7
            yield (eid, exam_ids[int(rand() * len(exam_ids))], user, int(closed),
                   stamp(rand() * _SPAN_SECONDS) if closed else None, dataset)

    _insert(conn, "logger_examlog", 6, exam_logs())

    def exam_attempts() -> Iterator[_Row]:
        for _ in range(counts["logger_examattemptlog"]):
            eid, user = examlogs[int(rand() * len(examlogs))]
            yield (uid(), eid, user, f"{bits(64):016x}:{bits(4)}", rand(),
                   f'{{"response": "{bits(16)}"}}' if rand() < 0.9 else None, dataset)

    _insert(conn, "logger_examattemptlog", 7, exam_attempts())


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="database file to write")
    parser.add_argument("--users", type=_count, default=30, help="facility users (>= 1)")
    parser.add_argument("--logs", type=_count, default=3000,
                        help="total rows over the six logger tables")
    parser.add_argument("--seed", type=int, default=1, help="random seed")
    parser.add_argument("--schema-only", action="store_true", help="write the empty schema")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    args = parser.parse_args(argv)
    out: Path = args.out
    if args.users < 1 and not args.schema_only:
        print("error: --users must be at least 1 (the facility's admin)", file=sys.stderr)
        return 2
    if out.exists() or out.is_symlink():
        if not args.force:
            print(f"error: {out} already exists; pass --force to overwrite it", file=sys.stderr)
            return 2
        if out.is_dir():
            print(f"error: {out} is a directory; give a file path", file=sys.stderr)
            return 2
        out.unlink()
        # A stale journal next to a fresh database would be replayed into it.
        for suffix in ("-journal", "-wal", "-shm"):
            Path(f"{out}{suffix}").unlink(missing_ok=True)
    try:
        conn = sqlite3.connect(out)
    except sqlite3.Error as exc:
        print(f"error: cannot create {out}: {exc}", file=sys.stderr)
        return 2
    try:
        # Nothing to protect while generating: a failed run deletes the file below.
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("PRAGMA synchronous=OFF")
        # Random UUID keys touch index pages all over the file; keep them in memory.
        conn.execute("PRAGMA cache_size=-262144")
        create_schema(conn)
        if args.schema_only:
            print(f"wrote empty facility schema to {out}", file=sys.stderr)
        else:
            facility = populate(conn, args.users, args.logs, args.seed)
            print(facility)
        conn.execute("PRAGMA journal_mode=DELETE")
    except sqlite3.Error as exc:
        conn.close()
        # With the journal off a half-written file is not a database anyone should open.
        out.unlink(missing_ok=True)
        print(f"error: cannot write {out}: {exc}", file=sys.stderr)
        return 2
    conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
