"""Kolibri-shaped rows on Kolibri 0.19's real schema (fixtures/kolibri_schema.sql), for the Kolibri profile's tests.

Each row's ``_morango_partition`` is written the way Kolibri's models compute it (each model's
``calculate_partition``), independently of bundlesync's profile, so tests can compare the two.
"""

from __future__ import annotations

import sqlite3
import uuid
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA = Path(__file__).resolve().parent.parent / "fixtures" / "kolibri_schema.sql"
NOW = "2026-01-01 10:00:00.000000"


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Facility:
    """Ids of what :func:`populate` made."""

    dataset: str
    facility: str
    classrooms: list[str] = field(default_factory=list)
    group: str = ""
    adhoc: str = ""
    coach: str = ""
    learners: list[str] = field(default_factory=list)
    lessons: dict[str, str] = field(default_factory=dict)  # name -> id
    exams: dict[str, str] = field(default_factory=dict)


def create_schema(conn: sqlite3.Connection) -> None:
    conn.executescript(SCHEMA.read_text())


class _Writer:
    def __init__(self, conn: sqlite3.Connection, dataset: str) -> None:
        self.conn, self.dataset = conn, dataset

    def row(self, table: str, partition: str, **values: object) -> str:
        values.setdefault("id", new_id())
        values = {"_morango_dirty_bit": 1, "_morango_source_id": new_id(), "_morango_partition": partition, **values}
        names = ", ".join(f'"{k}"' for k in values)
        self.conn.execute(f'INSERT INTO "{table}" ({names}) VALUES ({", ".join("?" * len(values))})', list(values.values()))
        return str(values["id"])

    def collection(self, kind: str, name: str, parent: str | None) -> str:
        return self.row("kolibriauth_collection", f"{self.dataset}:allusers-ro", name=name, kind=kind,
                        dataset_id=self.dataset, parent_id=parent)

    def user(self, facility: str, name: str) -> str:
        uid = new_id()
        return self.row("kolibriauth_facilityuser", f"{self.dataset}:user-ro:{uid}", id=uid, password="x",
                        username=name, full_name=name.title(), date_joined=NOW, dataset_id=self.dataset,
                        facility_id=facility, birth_year="NOT_SPECIFIED", gender="NOT_SPECIFIED", id_number="")

    def member(self, user: str, collection: str) -> None:
        self.row("kolibriauth_membership", f"{self.dataset}:user-ro:{user}", user_id=user, collection_id=collection,
                 dataset_id=self.dataset)

    def log_partition(self, user: str | None) -> str:
        return f"{self.dataset}:user-rw:{user}" if user else f"{self.dataset}:anonymous"


def populate(conn: sqlite3.Connection) -> Facility:
    """One facility: 2 classrooms, a learner group and an ad hoc group in the first, a coach and 4 learners,
    lessons and quizzes assigned to classrooms and groups (one of each inactive), learning logs (one anonymous),
    attendance, bookmarks, device status and course sessions with assignments to classrooms and groups."""
    dataset = new_id()
    w = _Writer(conn, dataset)
    w.row("kolibriauth_facilitydataset", f"{dataset}:allusers-ro", id=dataset, description="", location="",
          learner_can_edit_username=1, learner_can_edit_name=1, learner_can_edit_password=1, learner_can_sign_up=1,
          learner_can_delete_account=1, learner_can_login_with_no_password=0, preset="formal",
          show_download_button_in_learn=1, registered=0, enable_mark_attendance=1)
    f = Facility(dataset, w.collection("facility", "School", None))
    f.classrooms = [w.collection("classroom", f"Class {n}", f.facility) for n in (1, 2)]
    c1, c2 = f.classrooms
    f.group = w.collection("learnergroup", "Group", c1)
    f.adhoc = w.collection("adhoclearnersgroup", "Ad hoc", c1)
    f.coach = w.user(f.facility, "coach")
    f.learners = [w.user(f.facility, f"learner{n}") for n in range(1, 5)]
    u1, u2, u3, u4 = f.learners
    w.row("kolibriauth_role", f"{dataset}:user-ro:{f.coach}", user_id=f.coach, collection_id=c1, dataset_id=dataset,
          kind="coach")
    for member, collection in ((u1, c1), (u2, c1), (u1, f.group), (u3, c1), (u3, f.adhoc), (u4, c2)):
        w.member(member, collection)

    def lesson(name: str, classroom: str, active: bool, *assigned_to: str) -> None:
        lid = w.row("lessons_lesson", dataset, title=name, description="", resources='[{"contentnode_id": "n1"}]',
                    is_active=int(active), collection_id=classroom, dataset_id=dataset, date_created=NOW + "(UTC)",
                    created_by_id=f.coach)
        f.lessons[name] = lid
        for collection in assigned_to:
            w.row("lessons_lessonassignment", dataset, collection_id=collection, dataset_id=dataset, lesson_id=lid,
                  assigned_by_id=f.coach)

    lesson("for class 1", c1, True, c1)
    lesson("for the group", c1, True, f.group)
    lesson("inactive", c1, False, c1)
    lesson("for class 2", c2, True, c2)

    def exam(name: str, classroom: str, active: bool, *assigned_to: str) -> None:
        eid = w.row("exams_exam", dataset, title=name, question_count=2, question_sources='[{"exercise_id": "e1"}]',
                    seed=1, active=int(active), archive=0, collection_id=classroom, creator_id=f.coach,
                    dataset_id=dataset, data_model_version=3, learners_see_fixed_order=0, date_created=NOW)
        f.exams[name] = eid
        for collection in assigned_to:
            w.row("exams_examassignment", dataset, collection_id=collection, dataset_id=dataset, exam_id=eid,
                  assigned_by_id=f.coach)

    exam("class and ad hoc", c1, True, c1, f.adhoc)
    exam("inactive quiz", c1, False, c1)

    user: str | None
    for user in (u1, None):
        session = w.row("logger_contentsessionlog", w.log_partition(user), content_id=new_id(), start_timestamp=NOW,
                        time_spent=1.5, progress=1.0, kind="exercise", extra_fields="{}", dataset_id=dataset,
                        user_id=user)
        if user:
            summary = w.row("logger_contentsummarylog", w.log_partition(user), content_id=new_id(), start_timestamp=NOW,
                            time_spent=1.5, progress=1.0, kind="exercise", extra_fields="{}", dataset_id=dataset,
                            user_id=user)
            mastery = w.row("logger_masterylog", w.log_partition(user), mastery_criterion="{}", start_timestamp=NOW,
                            mastery_level=1, complete=0, dataset_id=dataset, summarylog_id=summary, user_id=user)
            w.row("logger_usersessionlog", w.log_partition(user), channels="[]", start_timestamp=NOW, pages="",
                  dataset_id=dataset, user_id=user)
            w.row("bookmarks_bookmark", w.log_partition(user), contentnode_id=new_id(), dataset_id=dataset,
                  user_id=user, created=NOW)
            w.row("device_learnerdevicestatus", w.log_partition(user), instance_id=new_id(), created_at=NOW,
                  updated_at=NOW, status="InsufficientStorage", status_sentiment=-1, dataset_id=dataset, user_id=user)
        else:
            mastery = None
        w.row("logger_attemptlog", w.log_partition(user), item="q", start_timestamp=NOW, end_timestamp=NOW,
              time_spent=1.0, complete=1, correct=1.0, hinted=0, simple_answer="", interaction_history="[]",
              dataset_id=dataset, masterylog_id=mastery, sessionlog_id=session, user_id=user, error=0)
    examlog = w.row("logger_examlog", dataset, closed=0, dataset_id=dataset, exam_id=f.exams["class and ad hoc"],
                    user_id=u3)
    w.row("logger_examattemptlog", dataset, item="q", start_timestamp=NOW, end_timestamp=NOW, time_spent=1.0,
          complete=1, correct=1.0, hinted=0, simple_answer="", interaction_history="[]", content_id=new_id(),
          dataset_id=dataset, examlog_id=examlog, user_id=u3, error=0)
    session = w.row("attendance_attendancesession", dataset, session_start_datetime=NOW, date_created=NOW,
                    date_modified=NOW, collection_id=c1, created_by_id=f.coach, dataset_id=dataset)
    w.row("attendance_attendancerecord", dataset, present=1, attendance_session_id=session, dataset_id=dataset,
          user_id=u1)

    # Course sessions are partitioned by the classroom above the row's collection (Kolibri's classroom partition).
    def course_partition(classroom: str) -> str:
        return f"{dataset}:classroom:{classroom}:coach-rw"

    course = w.row("courses_coursesession", course_partition(c1), course=new_id(), title="Course", is_active=1,
                   date_created=NOW, collection_id=c1, created_by_id=f.coach, dataset_id=dataset, channel_version=1)
    for collection in (c1, f.group):
        w.row("courses_coursesessionassignment", course_partition(c1), assigned_by_id=f.coach,
              collection_id=collection, course_session_id=course, dataset_id=dataset)
    for collection, test in ((f.adhoc, "pre"), (c1, "post")):
        w.row("courses_unittestassignment", course_partition(c1), unit_contentnode_id=new_id(), test_type=test,
              activated_by_id=f.coach, collection_id=collection, course_session_id=course, dataset_id=dataset,
              closed=0)
    course2 = w.row("courses_coursesession", course_partition(c2), course=new_id(), title="Course 2", is_active=1,
                    date_created=NOW, collection_id=c2, created_by_id=f.coach, dataset_id=dataset)
    w.row("courses_coursesessionassignment", course_partition(c2), assigned_by_id=f.coach, collection_id=c2,
          course_session_id=course2, dataset_id=dataset)
    return f


def make_db(path: Path, *, schema_only: bool = False) -> Facility | None:
    conn = sqlite3.connect(path)
    try:
        create_schema(conn)
        made = None if schema_only else populate(conn)
        conn.commit()
    finally:
        conn.close()
    return made
