"""Tests for bundlesync.profile: the reference profile, partitions in Python and SQL, and every refusal."""

from __future__ import annotations

import copy
import re
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from bundlesync.errors import ProfileError
from bundlesync.profile import Profile, TableSpec, bind_profile, load_profile

__all__: list[str] = []

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "fixtures" / "facility_profile.yaml"


import make_facility_db as mfd  # noqa: E402 - on sys.path via conftest



@pytest.fixture(scope="module")
def facility_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sqlite3.Connection]:
    path = tmp_path_factory.mktemp("facility") / "facility.sqlite3"
    conn = sqlite3.connect(path)
    mfd.create_schema(conn)
    mfd.populate(conn, 45, 4000, 11)
    conn.row_factory = sqlite3.Row
    yield conn
    conn.close()


@pytest.fixture()
def reference() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(PROFILE.read_text(encoding="utf-8"))
    return data


def _write(tmp_path: Path, data: Any, name: str = "profile.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def _table(data: dict[str, Any], name: str) -> dict[str, Any]:
    return next(t for t in data["tables"] if t["name"] == name)


# --------------------------------------------------------------------------- the reference profile


def test_reference_profile_loads_binds_and_orders_parents_first(facility_db: sqlite3.Connection) -> None:
    profile = bind_profile(load_profile(PROFILE), facility_db)
    assert (profile.name, profile.version, profile.source) == ("facilitydata", 1, PROFILE)
    order = [t.name for t in profile.tables]
    assert sorted(order) == sorted(mfd.TABLES)
    for child in profile.tables:
        for parent in child.foreign_keys.values():
            assert order.index(parent) < order.index(child.name), (parent, child.name)
    assert order.index("kolibriauth_facilitydataset") < order.index("kolibriauth_collection") \
        < order.index("kolibriauth_facilityuser") < order.index("logger_contentsessionlog") \
        < order.index("logger_attemptlog")
    assert profile.table("kolibriauth_collection").self_reference == "parent_id"
    for spec in profile.tables:
        columns = [r[1] for r in facility_db.execute(f"PRAGMA table_info({spec.name})")]
        assert spec.columns == tuple(columns)
    assert profile.has_table("logger_masterylog") and not profile.has_table("nope")
    with pytest.raises(ProfileError, match="'nope' is not in profile 'facilitydata'"):
        profile.table("nope")


def test_every_declared_database_foreign_key_is_in_the_profile(facility_db: sqlite3.Connection) -> None:
    profile = load_profile(PROFILE)
    for spec in profile.tables:
        declared = {(r[3], r[2]) for r in facility_db.execute(f"PRAGMA foreign_key_list({spec.name})")}
        expected = set(spec.foreign_keys.items())
        if spec.self_reference:
            expected.add((spec.self_reference, spec.name))
        assert declared == expected, spec.name


def test_partition_of_and_partition_sql_agree_on_every_row(facility_db: sqlite3.Connection) -> None:
    profile = bind_profile(load_profile(PROFILE), facility_db)
    dataset = facility_db.execute("SELECT id FROM kolibriauth_facilitydataset").fetchone()[0]
    seen: set[str] = set()
    for spec in profile.tables:
        rows = facility_db.execute(f"SELECT t.*, {spec.partition_sql('t')} AS _p FROM {spec.name} AS t").fetchall()
        assert rows, spec.name
        for row in rows:
            assert spec.partition_of(row) == row["_p"]
            seen.add(row["_p"].split(":")[1] if ":" in row["_p"] else "")
        unqualified = facility_db.execute(f"SELECT {spec.partition_sql()} FROM {spec.name}").fetchall()
        assert [r[0] for r in unqualified] == [r["_p"] for r in rows]
        assert all(r["_p"].startswith(dataset) for r in rows)
    assert seen == {"", "allusers-ro", "user-ro", "user-rw", "anonymous"}


def test_scopes_substitute_kolibri_prefixes() -> None:
    profile = load_profile(PROFILE)
    assert set(profile.scopes) == {"full", "user"}
    full, user = profile.scopes["full"], profile.scopes["user"]
    assert full.read_prefixes(dataset_id="D") == full.write_prefixes(dataset_id="D") == ("D",)
    assert user.read_prefixes(dataset_id="D", user_id="U") == ("D:user-rw:U", "D:allusers-ro", "D:user-ro:U")
    assert user.write_prefixes(dataset_id="D", user_id="U") == ("D:user-rw:U", "D:anonymous")
    with pytest.raises(ProfileError, match="needs the parameter 'user_id'"):
        user.read_prefixes(dataset_id="D")


def test_digest_follows_meaning_not_spelling(tmp_path: Path, reference: dict[str, Any]) -> None:
    original = load_profile(PROFILE)
    assert re.fullmatch(r"[0-9a-f]{64}", original.digest)
    assert load_profile(_write(tmp_path, reference)).digest == original.digest
    changed = copy.deepcopy(reference)
    _table(changed, "logger_examlog")["partition"] = "${dataset_id}:exams"
    assert load_profile(_write(tmp_path, changed, "b.yaml")).digest != original.digest
    empty = sqlite3.connect(":memory:")
    mfd.create_schema(empty)
    assert bind_profile(original, empty).digest == original.digest


def test_partition_of_without_applicable_alternative_raises() -> None:
    spec = load_profile(PROFILE).table("logger_contentsummarylog")
    with pytest.raises(ProfileError, match="NULL in user_id"):
        spec.partition_of({"dataset_id": "D", "user_id": None})
    anonymous = load_profile(PROFILE).table("logger_contentsessionlog")
    assert anonymous.partition_of({"dataset_id": "D", "user_id": None}) == "D:anonymous"
    assert anonymous.template_columns() == ("dataset_id", "user_id")


# --------------------------------------------------------------------------- load errors


def _expect(path: Path, *fragments: str) -> str:
    with pytest.raises(ProfileError) as caught:
        load_profile(path)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_file(tmp_path: Path) -> None:
    _expect(tmp_path / "absent.yaml", "absent.yaml", "does not exist", "check the path")


def test_unreadable_path(tmp_path: Path) -> None:
    _expect(tmp_path, "cannot read profile", str(tmp_path))


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nversion: 1\ntables: [\n  {name: a\n", encoding="utf-8")
    _expect(path, "bad.yaml", "not valid YAML", "line ", "fix the syntax")


def test_yaml_duplicate_key(tmp_path: Path) -> None:
    text = PROFILE.read_text(encoding="utf-8").replace("version: 1\n", "version: 1\nversion: 2\n")
    path = tmp_path / "dup.yaml"
    path.write_text(text, encoding="utf-8")
    _expect(path, "duplicate key 'version'", "line 7")


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- name: x\n", encoding="utf-8")
    _expect(path, "must be a mapping", "not list")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    _expect(path, "latin.yaml", "not valid YAML")


Mutation = Callable[[dict[str, Any]], Any]


def _set(key: str, value: Any) -> Mutation:
    return lambda d: d.__setitem__(key, value)


def _tab(name: str, key: str, value: Any) -> Mutation:
    return lambda d: _table(d, name).__setitem__(key, value)


BAD: list[tuple[str, Mutation, tuple[str, ...]]] = [
    ("extra top-level key", _set("x", 1), ("unknown key 'x'", "allowed: name, version")),
    ("missing key", lambda d: d.pop("scopes"), ("missing key 'scopes'", "add it")),
    ("unknown key", _set("verison", 2), ("unknown key 'verison'", "did you mean 'version'?")),
    ("version type", _set("version", "1"), ("version must be an integer", "'1'")),
    ("version bool", _set("version", True), ("version must be an integer",)),
    ("bad name", _set("name", "face data"), ("name 'face data'", "rename it")),
    ("tables empty", _set("tables", []), ("'tables' must be a non-empty list",)),
    ("table not mapping", _set("tables", ["kolibriauth_role"]), ("tables[0]", "must be a mapping")),
    ("table unknown key", _tab("kolibriauth_role", "partitions", "x"), ("unknown key 'partitions'", "'partition'")),
    ("table missing pk", lambda d: _table(d, "kolibriauth_role").pop("primary_key"), ("missing key 'primary_key'",)),
    ("pk type", _tab("kolibriauth_role", "primary_key", 3), ("table 'kolibriauth_role'", "'primary_key' must be")),
    ("fk type", _tab("kolibriauth_role", "foreign_keys", ["user_id"]), ("'foreign_keys' must map",)),
    ("exclude type", _tab("kolibriauth_role", "exclude", {"a": 1}), ("'exclude' must be",)),
    ("partition type", _tab("kolibriauth_role", "partition", 5), ("'partition' must be",)),
    ("dollar without braces", _tab("kolibriauth_role", "partition", "${dataset_id}:user-ro:$user_id"),
     ("table 'kolibriauth_role'", "'$' outside a ${name} placeholder")),
    ("partition not dataset first", _tab("kolibriauth_role", "partition", "role:${dataset_id}"),
     ("must start with ${dataset_id}",)),
    ("scope unknown placeholder", lambda d: d["scopes"]["user"].__setitem__("read", ["${dataset_id}:${group_id}"]),
     ("scope 'user'", "unknown variable ${group_id}", "dataset_id, user_id")),
    ("full scope has no user", lambda d: d["scopes"]["full"].__setitem__("read", ["${dataset_id}:${user_id}"]),
     ("scope 'full'", "unknown variable ${user_id}")),
    ("scope bare dollar", lambda d: d["scopes"]["user"].__setitem__("write", ["${dataset_id}:$user_id"]),
     ("'$' outside",)),
    ("scope missing full", lambda d: d["scopes"].pop("full"), ("missing key 'full'",)),
    ("scope unknown name", lambda d: d["scopes"].__setitem__("usr", {}), ("unknown key 'usr'", "'user'")),
    ("scope unknown key", lambda d: d["scopes"]["full"].__setitem__("readwrite", []), ("did you mean 'read_write'",)),
    ("facility missing table", lambda d: d["facility"].pop("table"), ("facility", "missing key 'table'")),
    ("facility where type", lambda d: d["facility"].__setitem__("where", 3), ("'where' must be an SQL condition",)),
    ("fk outside profile", _tab("kolibriauth_role", "foreign_keys", {"user_id": "auth_user"}),
     ("foreign key 'user_id' references 'auth_user'", "not in the profile")),
    ("fk to itself", _tab("kolibriauth_role", "foreign_keys", {"user_id": "kolibriauth_role"}),
     ("points at the table itself", "self_reference")),
    ("self ref also fk", _tab("kolibriauth_collection", "foreign_keys",
                              {"parent_id": "kolibriauth_facilitydataset"}), ("both 'self_reference'",)),
    ("duplicate table", lambda d: d["tables"].append(copy.deepcopy(d["tables"][0])), ("listed twice",)),
    ("own tables", lambda d: d["tables"].append({"name": "bundlesync_store", "primary_key": "id",
                                                 "partition": "${dataset_id}"}), ("cannot be synced",)),
    ("exclude pk", _tab("kolibriauth_role", "exclude", ["id"]), ("excluded column 'id' is the primary key",)),
    ("exclude partition column", _tab("kolibriauth_role", "exclude", ["user_id"]), ("excluded column 'user_id'",)),
    ("exclude template column", _tab("logger_contentsessionlog", "exclude", ["user_id"]),
     ("used by the partition template",)),
    ("exclude fk", _tab("kolibriauth_role", "exclude", ["collection_id"]), ("'collection_id' is a foreign key",)),
    ("exclude dataset", _tab("lessons_lesson", "exclude", ["dataset_id"]), ("'dataset_id' is the dataset column",)),
    ("exclude self ref", _tab("kolibriauth_collection", "exclude", ["parent_id"]), ("the self-reference",)),
]


@pytest.mark.parametrize(("mutate", "fragments"), [(m, f) for _, m, f in BAD], ids=[i for i, _, _ in BAD])
def test_invalid_profiles_are_refused(tmp_path: Path, reference: dict[str, Any], mutate: Mutation,
                                      fragments: tuple[str, ...]) -> None:
    mutate(reference)
    path = _write(tmp_path, reference)
    message = _expect(path, *fragments)
    assert message.startswith(f"profile {path}"), message


def test_foreign_key_cycle_is_named(tmp_path: Path, reference: dict[str, Any]) -> None:
    _table(reference, "kolibriauth_facilitydataset")["foreign_keys"] = {"extra_fields": "logger_masterylog"}
    message = _expect(_write(tmp_path, reference), "cycle")
    cycle = re.search(r"cycle (.*?);", message)
    assert cycle is not None
    names = cycle.group(1).split(" -> ")
    assert names[0] == names[-1] and len(names) > 2
    assert "logger_masterylog" in names and "kolibriauth_facilitydataset" in names


def test_two_table_cycle(tmp_path: Path) -> None:
    data = {"name": "p", "version": 1, "facility": {"table": "a"}, "scopes": {"full": {"read_write": "${dataset_id}"}},
            "tables": [{"name": "a", "primary_key": "id", "partition": "${dataset_id}", "foreign_keys": {"b_id": "b"}},
                       {"name": "b", "primary_key": "id", "partition": "${dataset_id}", "foreign_keys": {"a_id": "a"}}]}
    _expect(_write(tmp_path, data), "cycle a -> b -> a")


def test_order_is_stable_and_parents_first(tmp_path: Path) -> None:
    def table(name: str, **fks: str) -> dict[str, Any]:
        return {"name": name, "primary_key": "id", "partition": "${dataset_id}", "foreign_keys": fks}

    data = {"name": "p", "version": 1, "facility": {"table": "a"}, "scopes": {"full": {"read_write": "${dataset_id}"}},
            "tables": [table("c", x="b"), table("z"), table("b", y="a"), table("a"), table("d")]}
    assert [t.name for t in load_profile(_write(tmp_path, data)).tables] == ["z", "a", "b", "c", "d"]


# --------------------------------------------------------------------------- bind errors


SMALL_PROFILE = {
    "name": "small", "version": 1,
    "facility": {"table": "ds", "id_column": "id", "dataset_column": "dataset_id"},
    "scopes": {"full": {"read_write": ["${dataset_id}"]}},
    "tables": [
        {"name": "ds", "primary_key": "id", "partition": "${dataset_id}"},
        {"name": "item", "primary_key": "uid", "partition": ["${dataset_id}:u:${owner}", "${dataset_id}:anon"],
         "foreign_keys": {"ds_id": "ds"}, "self_reference": "parent", "exclude": ["cache"]},
    ],
}
SMALL_SCHEMA = """
CREATE TABLE ds (id TEXT PRIMARY KEY, dataset_id TEXT);
CREATE TABLE item (uid TEXT PRIMARY KEY, ds_id TEXT, parent TEXT, owner TEXT, dataset_id TEXT, cache BLOB);
"""


def _bind_small(tmp_path: Path, schema: str = SMALL_SCHEMA, mutate: Mutation | None = None) -> Profile:
    data = copy.deepcopy(SMALL_PROFILE)
    if mutate is not None:
        mutate(data)
    conn = sqlite3.connect(tmp_path / "app.sqlite3")
    conn.executescript(schema)
    try:
        return bind_profile(load_profile(_write(tmp_path, data)), conn)
    finally:
        conn.close()


def test_small_profile_binds_and_excludes(tmp_path: Path) -> None:
    profile = _bind_small(tmp_path)
    assert profile.table("item").columns == ("uid", "ds_id", "parent", "owner", "dataset_id")
    assert [t.name for t in profile.tables] == ["ds", "item"]


def _bind_error(tmp_path: Path, *fragments: str, schema: str = SMALL_SCHEMA, mutate: Mutation | None = None) -> None:
    with pytest.raises(ProfileError) as caught:
        _bind_small(tmp_path, schema, mutate)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


BAD_BINDS: list[tuple[str, str, Mutation | None, tuple[str, ...]]] = [
    ("unknown table", SMALL_SCHEMA.replace("item", "items"), None, ("table 'item' is not a table", "'items'")),
    ("view is not a table", SMALL_SCHEMA.replace("CREATE TABLE item", "CREATE TABLE x")
     + "CREATE VIEW item AS SELECT * FROM x;", None, ("table 'item' is not a table",)),
    ("unknown pk", SMALL_SCHEMA.replace("uid TEXT", "id TEXT"), None, ("column 'uid' (primary_key)",)),
    ("unknown fk column", SMALL_SCHEMA.replace("ds_id", "dataset"), None, ("column 'ds_id' (foreign_keys)",)),
    ("unknown self reference", SMALL_SCHEMA.replace("parent TEXT", "parent_id TEXT"), None,
     ("column 'parent' (self_reference)", "did you mean 'parent_id'")),
    ("unknown excluded", SMALL_SCHEMA.replace("cache BLOB", "cached BLOB"), None, ("column 'cache' (exclude)",)),
    ("unknown dataset column", SMALL_SCHEMA, lambda d: _table(d, "ds").update(dataset_column="ds", partition="${ds}"),
     ("column 'ds' (dataset_column)",)),
    ("unknown template variable", SMALL_SCHEMA.replace("owner TEXT", "Owner_Id TEXT"), None,
     ("column 'owner' (partition template variable)",)),
    ("case differs", SMALL_SCHEMA.replace("owner TEXT", "OWNER TEXT"), None, ("did you mean 'OWNER'",)),
    ("composite pk", SMALL_SCHEMA.replace("uid TEXT PRIMARY KEY, ds_id TEXT", "uid TEXT, ds_id TEXT")
     .replace("cache BLOB)", "cache BLOB, PRIMARY KEY (uid, ds_id))"), None, ("globally unique primary key",)),
    ("no pk", SMALL_SCHEMA.replace("uid TEXT PRIMARY KEY", "uid TEXT"), None, ("primary_key 'uid'", "UNIQUE")),
    ("partial unique index", SMALL_SCHEMA.replace("uid TEXT PRIMARY KEY", "uid TEXT")
     + "CREATE UNIQUE INDEX u ON item (uid) WHERE uid IS NOT NULL;", None, ("globally unique",)),
    ("multi-column unique index", SMALL_SCHEMA.replace("uid TEXT PRIMARY KEY", "uid TEXT")
     + "CREATE UNIQUE INDEX u ON item (uid, owner);", None, ("globally unique",)),
    ("real partition column", SMALL_SCHEMA.replace("owner TEXT", "owner DOUBLE PRECISION"), None,
     ("partition column 'owner'", "TEXT or INTEGER")),
    ("facility column", SMALL_SCHEMA, lambda d: d["facility"].__setitem__("id_column", "uuid"),
     ("facility id_column 'uuid'",)),
    ("facility where", SMALL_SCHEMA, lambda d: d["facility"].__setitem__("where", "kind = = 1"),
     ("facility 'where'", "fix the SQL")),
    ("facility table", SMALL_SCHEMA, lambda d: d["facility"].__setitem__("table", "facility"),
     ("table 'facility' is not a table",)),
]


@pytest.mark.parametrize(("schema", "mutate", "fragments"), [b[1:] for b in BAD_BINDS], ids=[b[0] for b in BAD_BINDS])
def test_bind_refuses_mismatches(tmp_path: Path, schema: str, mutate: Mutation | None,
                                 fragments: tuple[str, ...]) -> None:
    _bind_error(tmp_path, *fragments, schema=schema, mutate=mutate)


# A rowid table keeps a "pk" index for every single-column PRIMARY KEY but a rowid alias; a WITHOUT ROWID table
# and the "INTEGER PRIMARY KEY DESC" quirk have one too, so their integer keys are not rowid aliases.
@pytest.mark.parametrize("key", ["uid TEXT UNIQUE", "uid TEXT NOT NULL", "uid INT PRIMARY KEY",
                                 "uid INTEGER PRIMARY KEY DESC", "uid INTEGER, id INTEGER PRIMARY KEY"])
def test_bind_accepts_unique_keys(tmp_path: Path, key: str) -> None:
    schema = SMALL_SCHEMA.replace("uid TEXT PRIMARY KEY", key)
    if "NOT NULL" in key or "id INTEGER" in key:
        schema += "CREATE UNIQUE INDEX by_uid ON item (uid);"
    assert _bind_small(tmp_path, schema).table("item").primary_key == "uid"


@pytest.mark.parametrize(("key", "constraint"), [("uid INTEGER PRIMARY KEY", ""),
                                                 ("uid integer primary key autoincrement", ""),
                                                 ("uid INTEGER NOT NULL", ", PRIMARY KEY (uid)")])
def test_bind_refuses_rowid_alias_primary_key(tmp_path: Path, key: str, constraint: str) -> None:
    # Rowids are allocated per device: two devices would both create row 1.
    schema = SMALL_SCHEMA.replace("uid TEXT PRIMARY KEY", key).replace("cache BLOB)", f"cache BLOB{constraint})")
    _bind_error(tmp_path, "primary key 'uid' of table 'item' is an INTEGER PRIMARY KEY, allocated per device",
                "UUID", schema=schema)


def test_bind_accepts_integer_key_of_without_rowid_table(tmp_path: Path) -> None:
    schema = SMALL_SCHEMA.replace("uid TEXT PRIMARY KEY", "uid INTEGER PRIMARY KEY").replace(
        "cache BLOB);", "cache BLOB) WITHOUT ROWID;")
    assert _bind_small(tmp_path, schema).table("item").primary_key == "uid"


def test_bind_ignores_the_connection_row_factory(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "app.sqlite3")
    conn.executescript(SMALL_SCHEMA)
    conn.row_factory = lambda cursor, row: {d[0]: v for d, v in zip(cursor.description, row)}
    profile = bind_profile(load_profile(_write(tmp_path, SMALL_PROFILE)), conn)
    assert profile.table("ds").columns == ("id", "dataset_id")
    conn.close()


# --------------------------------------------------------------------------- property: Python == SQL


_LITERAL = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="$\x00"), max_size=6)
_VALUE = st.one_of(st.none(), st.text(alphabet=st.characters(codec="utf-8"), max_size=8),
                   st.sampled_from(["", "'", "''", ":", "%s", "%", "学生", "Łukasz", "a'b:c"]),
                   st.integers(min_value=-(2**63), max_value=2**63 - 1))
_TEMPLATE = st.lists(st.one_of(_LITERAL, st.sampled_from(["${a}", "${b}", "${c}", "${dataset_id}"])),
                     max_size=4).map(lambda parts: "${dataset_id}" + "".join(parts))


@settings(max_examples=300, deadline=None)
@given(partitions=st.lists(_TEMPLATE, min_size=1, max_size=3), rows=st.lists(
    st.fixed_dictionaries({"dataset_id": _VALUE, "a": _VALUE, "b": _VALUE, "c": _VALUE}), min_size=1, max_size=5))
def test_partition_sql_equals_partition_of(partitions: list[str], rows: list[dict[str, object]]) -> None:
    spec = TableSpec(name="t", primary_key="id", partitions=tuple(partitions), dataset_column="dataset_id",
                     foreign_keys={}, self_reference=None, exclude=frozenset())
    conn = sqlite3.connect(":memory:")
    conn.execute('CREATE TABLE "t" (id INTEGER PRIMARY KEY, dataset_id TEXT, a TEXT, b INTEGER, c)')
    for row in rows:
        # Python sees what SQLite stores (column affinity may turn '12' into 12 in b).
        conn.execute("DELETE FROM t")
        conn.execute("INSERT INTO t (dataset_id, a, b, c) VALUES (:dataset_id, :a, :b, :c)", row)
        conn.row_factory = sqlite3.Row
        stored = conn.execute(f"SELECT *, {spec.partition_sql('x y')} AS _p FROM t AS \"x y\"").fetchone()
        conn.row_factory = None
        try:
            expected: str | None = spec.partition_of(stored)
        except ProfileError:
            expected = None
        assert stored["_p"] == expected
    conn.close()
