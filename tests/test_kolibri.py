"""The built-in Kolibri profile on Kolibri 0.19's real schema: partitions, received columns, lookup
partitions, and the plugin that brings a learner's lessons and quizzes to their single-user device."""

from __future__ import annotations

import json
import shutil
import sqlite3
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, run_cli
from kolibri_rows import Facility, make_db

from bundlesync.errors import ProfileError
from bundlesync.format.records import Version
from bundlesync.profile import bind_profile, builtin_profiles, load_profile, parse_profile
from bundlesync.replica.db import migrate
from bundlesync.replica.store import read_records, upsert_versions
from bundlesync.replica.tracking import install_table_triggers, suppressed
from bundlesync.sync.deserialize import deserialize

COURSES = ("courses_coursesession", "courses_coursesessionassignment", "courses_unittestassignment")


@pytest.fixture
def kolibri_db(tmp_path: Path) -> tuple[Path, Facility]:
    path = tmp_path / "a.sqlite3"
    made = make_db(path)
    assert made is not None
    return path, made


def _rows(path: Path, table: str, where: str = "", params: tuple[object, ...] = ()) -> list[dict[str, object]]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(f'SELECT * FROM "{table}" {where}', params)]
    finally:
        conn.close()


def test_kolibri_profile_is_built_in_and_ships_in_the_wheel() -> None:
    assert "kolibri" in builtin_profiles()
    profile = load_profile("kolibri")
    assert len(profile.tables) == 25 and set(profile.scopes) == {"full", "user"}
    assert profile.plugins == ("bundlesync.contrib.kolibri",)
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "*.yaml" in package_data["bundlesync.profiles"]
    listed = json.loads(run_cli(None, "profiles", "--json").out)
    assert [(p["name"], p["tables"], p["plugins"]) for p in listed if p["name"] == "kolibri"] == [
        ("kolibri", 25, ["bundlesync.contrib.kolibri"])]


def test_the_profile_covers_every_morango_table_of_the_schema(tmp_path: Path) -> None:
    make_db(tmp_path / "s.sqlite3", schema_only=True)
    conn = sqlite3.connect(tmp_path / "s.sqlite3")
    morango = {r[0] for r in conn.execute(
        "SELECT m.name FROM sqlite_master m WHERE m.type = 'table' AND EXISTS "
        "(SELECT 1 FROM pragma_table_info(m.name) WHERE name = '_morango_partition')")}
    profile = bind_profile(load_profile("kolibri"), conn)
    assert {t.name for t in profile.tables} == morango and len(morango) == 25
    for table in profile.tables:  # the dirty bit and partition never travel; the source id does
        assert set(table.receive) == {"_morango_dirty_bit", "_morango_partition"}
        assert "_morango_source_id" in table.columns and "_morango_dirty_bit" not in table.columns


def test_partitions_equal_what_kolibri_computes_for_every_row(kolibri_db: tuple[Path, Facility]) -> None:
    path, _ = kolibri_db
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    profile = bind_profile(load_profile("kolibri"), conn)
    seen = 0
    for table in profile.tables:
        rows = conn.execute(f'SELECT t.*, {table.partition_sql("t")} AS bundlesync_p FROM "{table.name}" AS t').fetchall()
        for row in rows:
            assert row["bundlesync_p"] == row["_morango_partition"], (table.name, dict(row))
            # What an importer checks from the row alone agrees too, and a changed claim is caught.
            assert table.partition_matches(row, row["_morango_partition"])
            assert not table.partition_matches(row, row["_morango_partition"] + "x")
            seen += 1
    assert seen == 51  # every table but the two per-learner copy tables (the plugin makes those)
    conn.close()


def test_lookup_partitions_follow_the_classroom_above_the_collection(kolibri_db: tuple[Path, Facility]) -> None:
    path, f = kolibri_db
    conn = sqlite3.connect(path)
    spec = bind_profile(load_profile("kolibri"), conn).table("courses_unittestassignment")
    by_collection = dict(conn.execute(f'SELECT collection_id, {spec.partition_sql("t")} FROM "{spec.name}" AS t'))
    assert by_collection[f.adhoc] == by_collection[f.classrooms[0]] == f"{f.dataset}:classroom:{f.classrooms[0]}:coach-rw"
    # A claim naming another classroom fails the shape check only where the row itself tells; the rest is the
    # database's job at write time (test below).
    row = {"dataset_id": f.dataset, "collection_id": f.adhoc}
    assert spec.partition_matches(row, f"{f.dataset}:classroom:{f.classrooms[1]}:coach-rw")
    assert not spec.partition_matches(row, f"{f.dataset}:classroom:{f.classrooms[1]}:learner-rw")
    assert not spec.partition_matches(row, f"other:classroom:{f.classrooms[0]}:coach-rw")
    conn.close()


@dataclass
class Devices:
    facility: Facility
    a_db: Path
    b_db: Path
    l_db: Path
    a: Path
    b: Path
    learner: Path
    drive: Path


def _build_devices(root: Path) -> Devices:
    """A (Kolibri rows, authority), B (empty schema, full certificate), L (learner1's device, user scope)."""
    a_db, b_db, l_db = root / "a.sqlite3", root / "b.sqlite3", root / "l.sqlite3"
    f = make_db(a_db)
    assert f is not None
    make_db(b_db, schema_only=True)
    make_db(l_db, schema_only=True)
    a, b, learner, drive = root / "devA", root / "devB", root / "devL", root / "drive"
    drive.mkdir()
    run_cli(a, "init", "--db", str(a_db), "--profile", "kolibri")
    run_cli(a, "facility", "provision", "--facility", f.facility)
    for home, db, scope in ((b, b_db, "full"), (learner, l_db, f"user:{f.learners[0]}")):
        run_cli(home, "init", "--db", str(db), "--profile", "kolibri")
        request = run_cli(home, "cert", "request", "--facility", f.facility, "--scope", scope, "--out", str(drive)).last_line
        run_cli(home, "cert", "install", run_cli(a, "cert", "issue", request, "--out", str(drive)).last_line)
    for item in drive.iterdir():
        item.unlink()
    return Devices(f, a_db, b_db, l_db, a, b, learner, drive)


@pytest.fixture(scope="module")
def devices_template(tmp_path_factory: pytest.TempPathFactory) -> Devices:
    """Set up once through the CLI; copied per test."""
    return _build_devices(tmp_path_factory.mktemp("kolibri-devices"))


@pytest.fixture
def devices(devices_template: Devices, tmp_path: Path) -> Devices:
    """A fresh copy of the three devices, each home's config pointing at its copied database."""
    t = devices_template
    root = t.a_db.parent
    for name in ("a.sqlite3", "b.sqlite3", "l.sqlite3"):
        shutil.copy2(root / name, tmp_path / name)
    for home, db in (("devA", "a.sqlite3"), ("devB", "b.sqlite3"), ("devL", "l.sqlite3")):
        shutil.copytree(root / home, tmp_path / home)
        config = tmp_path / home / "config.yaml"
        data = yaml.safe_load(config.read_text())
        data["db"] = str(tmp_path / db)
        config.write_text(yaml.safe_dump(data))
    (tmp_path / "drive").mkdir()
    return Devices(t.facility, tmp_path / "a.sqlite3", tmp_path / "b.sqlite3", tmp_path / "l.sqlite3",
                   tmp_path / "devA", tmp_path / "devB", tmp_path / "devL", tmp_path / "drive")


def test_init_by_built_in_name_keeps_the_name_in_config(devices: Devices) -> None:
    config = yaml.safe_load((devices.a / "config.yaml").read_text())
    assert config["profile"] == "kolibri"
    assert "bundlesync.contrib.kolibri" in run_cli(devices.a, "plugins").out


def test_received_columns_are_set_on_the_receiving_side(devices: Devices) -> None:
    d = devices
    bundle = run_cli(d.a, "export", "--facility", d.facility.facility, "--out", str(d.drive)).last_line
    run_cli(d.b, "import", bundle)
    conn = sqlite3.connect(d.b_db)
    profile = bind_profile(load_profile("kolibri"), conn)
    for table in profile.tables:
        a_rows = {r["id"]: r for r in _rows(d.a_db, table.name)}
        b_rows = {r["id"]: r for r in _rows(d.b_db, table.name)}
        assert a_rows.keys() == b_rows.keys(), table.name
        assert a_rows or "individualsyncable" in table.name, table.name
        for key, row in b_rows.items():
            assert row["_morango_dirty_bit"] == 0 and a_rows[key]["_morango_dirty_bit"] == 1
            assert row["_morango_partition"] == a_rows[key]["_morango_partition"]
            assert {k: v for k, v in row.items() if k != "_morango_dirty_bit"} == {
                k: v for k, v in a_rows[key].items() if k != "_morango_dirty_bit"}
    # Neither column travels: the store (what bundles carry) has no trace of them.
    for data in [r["data"] for r in read_records(conn, profile)]:
        assert not {"_morango_dirty_bit", "_morango_partition"} & json.loads(data).keys()
    conn.close()


def _store_version(model: str, record: dict[str, object], partition: str, ctr: int) -> tuple[Version, bool]:
    data = json.dumps({k: v for k, v in record.items() if k not in ("_morango_dirty_bit", "_morango_partition")})
    return Version(model=model, id=str(record["id"]), partition=partition, data=data, deleted=False, purged=False,
                   hlc=ctr << 16, inst="e" * 32, ctr=ctr, vv={"e" * 32: ctr}), True


def test_a_lookup_partition_is_recomputed_before_the_row_is_written(kolibri_db: tuple[Path, Facility],
                                                                    tmp_path: Path) -> None:
    """A course row waits while the collections its partition is looked up from are missing, is written when they
    arrive, and is never written under a partition its data does not give."""
    source, f = kolibri_db
    target = tmp_path / "t.sqlite3"
    make_db(target, schema_only=True)
    conn = sqlite3.connect(target, isolation_level=None)
    migrate(conn)
    profile = bind_profile(load_profile("kolibri"), conn)
    for table in profile.tables:  # as `init` does: the prior tables its triggers keep rows in
        install_table_triggers(conn, table)
    assignment = _rows(source, "courses_unittestassignment", "WHERE collection_id = ?", (f.adhoc,))[0]
    session = _rows(source, "courses_coursesession", "WHERE id = ?", (assignment["course_session_id"],))[0]
    forged = dict(assignment, id="f" * 32)
    right, wrong = str(assignment["_morango_partition"]), f"{f.dataset}:classroom:{f.classrooms[1]}:coach-rw"
    parents = [("kolibriauth_facilitydataset", r) for r in _rows(source, "kolibriauth_facilitydataset")]
    parents += [("kolibriauth_facilityuser", r) for r in _rows(source, "kolibriauth_facilityuser", "WHERE id = ?", (f.coach,))]
    parents += [("courses_coursesession", session)]
    conn.execute("BEGIN")
    upsert_versions(conn, [_store_version(m, r, str(r["_morango_partition"]), 1) for m, r in parents], None)
    upsert_versions(conn, [_store_version("courses_unittestassignment", assignment, right, 2),
                           _store_version("courses_unittestassignment", forged, wrong, 2)], None)
    with suppressed(conn):
        first = deserialize(conn, profile)
    assert first.waiting == 4  # the coach, the session, the assignment and the forged one: no collections yet
    collections = [("kolibriauth_collection", r) for r in _rows(source, "kolibriauth_collection")]
    upsert_versions(conn, [_store_version(m, r, str(r["_morango_partition"]), 3) for m, r in collections], None)
    with suppressed(conn):
        second = deserialize(conn, profile)
    conn.execute("COMMIT")
    written = {r["id"]: r for r in _rows(target, "courses_unittestassignment")}
    assert list(written) == [assignment["id"]] and written[assignment["id"]]["_morango_partition"] == right
    error = conn.execute("SELECT error FROM bundlesync_store WHERE id = ?", (forged["id"],)).fetchone()[0]
    assert error.startswith("refused: it claims partition") and wrong in error
    assert second.failed == 1 and second.waiting == 0
    conn.close()


@pytest.mark.parametrize(("change", "message"), [
    ({"lookups": {"classroom_id": {"lookup": "created_by_id", "up": "parent_id", "until": "kind = 'x'"}}},
     "'up' 'parent_id' must be the self_reference of 'kolibriauth_facilityuser'"),
    ({"lookups": {"classroom_id": {"lookup": "course", "column": "id"}}}, "'lookup' 'course' is not a declared foreign key"),
    ({"lookups": {"classroom_id": {"lookup": "collection_id", "up": "parent_id"}}}, "'up' needs 'until'"),
    ({"lookups": {"classroom_id": {"sql": "x", "lookup": "collection_id"}}}, "give either 'sql'"),
    ({"lookups": {"other": {"sql": "1"}}}, "lookup 'other': no partition template uses it"),
    ({"receive": {"created_by_id": 0}}, "received column 'created_by_id' is a foreign key and must travel"),
    ({"receive": {"title": {"sql": "${_morango_dirty_bit}"}}}, "uses ${_morango_dirty_bit}, which does not travel"),
    ({"receive": {"title": [1]}}, "must be a constant or {sql: EXPR}"),
    ({"exclude": ["_morango_partition"]}, "under both 'exclude' and 'receive'"),
])
def test_invalid_lookups_and_receive_values_are_refused_in_one_line(change: dict[str, object], message: str) -> None:
    data = yaml.safe_load(builtin_profiles()["kolibri"].read_text())
    table = next(t for t in data["tables"] if t["name"] == "courses_coursesession")
    for key, value in change.items():
        table[key] = {**table.get(key, {}), **value} if isinstance(value, dict) else value
    with pytest.raises(ProfileError) as info:
        parse_profile(data)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_sql_and_unreceived_not_null_columns_fail_init_in_one_line(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite3"
    make_db(db, schema_only=True)
    data = yaml.safe_load(builtin_profiles()["kolibri"].read_text())
    data["tables"][0]["receive"] = {"_morango_dirty_bit": {"sql": "no_such_function(${id})"},
                                    "_morango_partition": {"sql": "${partition}"}}
    bad_sql = tmp_path / "bad_sql.yaml"
    bad_sql.write_text(yaml.safe_dump(data))
    result = run_cli(tmp_path / "h1", "init", "--db", str(db), "--profile", str(bad_sql), check=False)
    assert result.code == 2 and "receive '_morango_dirty_bit' is not valid SQL" in result.err
    assert len(result.err.strip().splitlines()) == 1
    data["tables"][0]["receive"] = {"_morango_partition": {"sql": "${partition}"}}
    data["tables"][0]["exclude"] = ["_morango_dirty_bit"]
    not_null = tmp_path / "not_null.yaml"
    not_null.write_text(yaml.safe_dump(data))
    result = run_cli(tmp_path / "h2", "init", "--db", str(db), "--profile", str(not_null), check=False)
    assert result.code == 2 and "'_morango_dirty_bit' is NOT NULL without a default" in result.err


def _assigned_titles(path: Path, table: str, assignment: str, ref: str, active: str) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {r[0] for r in conn.execute(
            f"SELECT DISTINCT x.title FROM {assignment} a JOIN {table} x ON x.id = a.{ref} AND x.{active}")}
    finally:
        conn.close()


def test_lessons_and_quizzes_assigned_to_a_learner_reach_their_device(devices: Devices) -> None:
    d, f = devices, devices.facility
    learner = f.learners[0]  # in class 1 and its learner group
    bundle = run_cli(d.a, "export", "--facility", f.facility, "--out", str(d.drive), "--user", learner).last_line
    run_cli(d.learner, "import", bundle)
    assert _assigned_titles(d.l_db, "lessons_lesson", "lessons_lessonassignment", "lesson_id", "is_active") == {
        "for class 1", "for the group"}
    assert _assigned_titles(d.l_db, "exams_exam", "exams_examassignment", "exam_id", "active") == {"class and ad hoc"}
    copies = _rows(d.a_db, "lessons_individualsyncablelesson")
    assert {c["user_id"] for c in copies} == {learner} and len(copies) == 2
    assert all(c["_morango_partition"] == f"{f.dataset}:user-ro:{learner}" for c in copies)
    lesson = _rows(d.l_db, "lessons_lesson", "WHERE title = 'for class 1'")[0]
    assert lesson["_morango_dirty_bit"] == 0 and lesson["created_by_id"] == learner and lesson["is_active"] == 1
    # Recreated locally, untracked: the learner's device never sends them back.
    conn = sqlite3.connect(d.l_db)
    assert conn.execute("SELECT count(*) FROM bundlesync_changes WHERE model LIKE 'lessons_%' OR model LIKE 'exams_%'"
                        ).fetchone()[0] == 0
    conn.close()

    # The coach renames one lesson and deactivates the other; the next export carries it to the learner.
    conn = sqlite3.connect(d.a_db)
    with conn:
        conn.execute("UPDATE lessons_lesson SET title = 'renamed' WHERE id = ?", (f.lessons["for class 1"],))
        conn.execute("UPDATE lessons_lesson SET is_active = 0 WHERE id = ?", (f.lessons["for the group"],))
    conn.close()
    bundle = run_cli(d.a, "export", "--facility", f.facility, "--out", str(d.drive), "--user", learner).last_line
    run_cli(d.learner, "import", bundle)
    assert _assigned_titles(d.l_db, "lessons_lesson", "lessons_lessonassignment", "lesson_id", "is_active") == {"renamed"}
    assert len(_rows(d.a_db, "lessons_individualsyncablelesson")) == 1


def test_a_quiz_assigned_twice_makes_one_copy_from_the_classroom(devices: Devices) -> None:
    d, f = devices, devices.facility
    learner = f.learners[2]  # in class 1 and in the ad hoc group; the quiz is assigned to both
    run_cli(d.a, "export", "--facility", f.facility, "--out", str(d.drive), "--user", learner)
    copies = _rows(d.a_db, "exams_individualsyncableexam")
    assert len(copies) == 1 and copies[0]["collection_id"] == f.classrooms[0]
    serialized = json.loads(str(copies[0]["serialized_exam"]))
    assert serialized["title"] == "class and ad hoc" and "active" not in serialized and "creator_id" not in serialized
    assert serialized["learners_see_fixed_order"] is False  # booleans as Kolibri serializes them
