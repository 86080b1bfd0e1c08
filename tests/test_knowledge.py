"""Per-prefix knowledge: the algebra (hypothesis), and the export's selection against it in SQLite."""

from __future__ import annotations

import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import PROFILE, make_db

from bundlesync.partitions import within
from bundlesync.profile import bind_profile, load_profile
from bundlesync.replica import db
from bundlesync.replica import knowledge as kn
from bundlesync.format.records import Version
from bundlesync.replica.store import upsert_versions
from bundlesync.replica.tracking import install_table_triggers
from bundlesync.sync.exporter import outgoing_lines

D = "d"
PARTITIONS = [D, f"{D}:allusers-ro", f"{D}:user-ro:u1", f"{D}:user-rw:u1", f"{D}:user-rw:u12", f"{D}:user-rw:u2",
              f"{D}:anonymous"]
PREFIXES = ["", *PARTITIONS]
INSTANCES = ["a", "b", "c"]

knowledge_st = st.dictionaries(
    st.sampled_from(PREFIXES), st.dictionaries(st.sampled_from(INSTANCES), st.integers(0, 6), max_size=3), max_size=4
)
filters_st = st.lists(st.sampled_from(PARTITIONS), min_size=1, max_size=3, unique=True)


def _at(k: kn.Knowledge, partition: str, inst: str) -> int:
    return kn.effective(k, partition).get(inst, 0)


@given(knowledge_st)
def test_normalize_keeps_what_is_held_everywhere(k: kn.Knowledge) -> None:
    norm = kn.normalize(k)
    assert all(_at(norm, p, i) == _at(k, p, i) for p in PARTITIONS for i in INSTANCES)
    assert kn.normalize(norm) == norm


@given(knowledge_st, knowledge_st)
def test_join_and_meet_are_pointwise_max_and_min_per_partition(a: kn.Knowledge, b: kn.Knowledge) -> None:
    joined, met = kn.join([a, b]), kn.meet([a, b])
    for p in PARTITIONS:
        for i in INSTANCES:
            assert _at(joined, p, i) == max(_at(a, p, i), _at(b, p, i))
            assert _at(met, p, i) == min(_at(a, p, i), _at(b, p, i))


@given(knowledge_st, filters_st)
def test_clip_keeps_exactly_what_lies_under_the_filter(k: kn.Knowledge, prefixes: list[str]) -> None:
    clipped = kn.clip(k, prefixes)
    assert all(within(p, prefixes) for p in clipped)
    for p in PARTITIONS:
        for i in INSTANCES:
            assert _at(clipped, p, i) == (_at(k, p, i) if within(p, prefixes) else 0)


@given(filters_st, filters_st)
def test_intersect_covers_what_both_cover(a: list[str], b: list[str]) -> None:
    both = kn.intersect(a, b)
    assert all(within(p, both) == (within(p, a) and within(p, b)) for p in PARTITIONS)


def test_a_flat_view_is_the_least_over_the_filter() -> None:
    k = {"d:user-rw:u1": {"a": 9, "c": 2}, "": {"me": 7}, "d:anonymous": {"c": 4}}
    assert kn.flat(k, ["d:user-rw:u1", "d:anonymous"]) == {"me": 7, "c": 2}


@settings(max_examples=40, deadline=None)
@given(knowledge_st, filters_st,
       st.lists(st.tuples(st.sampled_from(PARTITIONS), st.sampled_from(INSTANCES), st.integers(1, 6)), max_size=25))
def test_export_selects_exactly_what_the_basis_does_not_hold(
    tmp_path_factory: pytest.TempPathFactory, basis: kn.Knowledge, prefixes: list[str], records: list[tuple[str, str, int]]
) -> None:
    path = tmp_path_factory.mktemp("sel") / "s.db"
    make_db(path, schema_only=True)
    conn = sqlite3.connect(path, isolation_level=None)
    db.migrate(conn)
    profile = bind_profile(load_profile(PROFILE), conn)
    for table in profile.tables:  # as `init` does: the prior tables its triggers keep rows in
        install_table_triggers(conn, table)
    model = profile.tables[0].name
    upsert_versions(conn, [(Version(model, str(n), p, "{}", False, False, 0, i, c, {}), False)
                           for n, (p, i, c) in enumerate(records)], None)
    clipped = kn.clip(basis, prefixes)
    lines = [line for batch in outgoing_lines(conn, profile, prefixes, clipped, {}) for line in batch]
    conn.close()
    expected = sorted(str(n) for n, (p, i, c) in enumerate(records)
                      if within(p, prefixes) and not kn.covers(clipped, p, i, c))
    got = sorted(line.split(b'"id":"')[1].split(b'"')[0].decode() for line in lines)
    assert got == expected
