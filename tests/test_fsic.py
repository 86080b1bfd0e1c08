"""FSIC arithmetic: held/offered views, gaps, and contiguous advance on a real database."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from bundlesync.replica import db, fsic


def test_held_is_min_over_prefixes() -> None:
    rows = [("d", "a", 5), ("d:user-rw:u1", "a", 9), ("", "me", 7), ("d:user-rw:u2", "b", 3)]
    prefixes = ["d:user-rw:u1", "d:user-rw:u2"]
    assert fsic.held(rows, prefixes) == {"a": 5, "me": 7}


def test_knowledge_of_one_user_says_nothing_of_a_user_whose_id_extends_it() -> None:
    rows = [("d:user-rw:u1", "a", 9)]
    assert fsic.held(rows, ["d:user-rw:u12"]) == {}
    assert fsic.held(rows, ["d:user-rw:u1"]) == {"a": 9}


def test_pointwise_min_drops_instances_a_peer_lacks() -> None:
    assert fsic.pointwise_min([{"a": 3, "b": 2}, {"a": 1}]) == {"a": 1}
    assert fsic.pointwise_min([]) == {}


def test_missing_reports_what_lies_between() -> None:
    assert fsic.missing({"a": 2}, {"a": 5, "b": 0, "c": 1}) == {"a": (2, 5), "c": (0, 1)}


def test_advance_only_over_contiguous_history(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "x.db", isolation_level=None)
    db.migrate(conn)
    with db.write_transaction(conn):
        gaps = fsic.advance(conn, ["d"], {"a": 3}, {"a": 7, "b": 2})
    assert gaps == {"a": (0, 3)}
    assert fsic.held(fsic.read_rows(conn), ["d"]) == {"b": 2}
    with db.write_transaction(conn):
        assert fsic.advance(conn, ["d"], {}, {"a": 3}) == {}
        assert fsic.advance(conn, ["d"], {"a": 3}, {"a": 7}) == {}
    assert fsic.held(fsic.read_rows(conn), ["d"]) == {"a": 7, "b": 2}
    with db.write_transaction(conn):
        fsic.advance(conn, ["d"], {}, {"a": 4})  # knowledge never goes down
    assert fsic.held(fsic.read_rows(conn), ["d"])["a"] == 7


def test_held_takes_the_highest_claim_whatever_the_row_order() -> None:
    rows = [("d:user-rw:u1", "a", 9), ("d", "a", 5), ("d", "b", 1)]
    assert fsic.held(rows, ["d:user-rw:u1"]) == {"a": 9, "b": 1}
    assert fsic.held(list(reversed(rows)), ["d:user-rw:u1"]) == {"a": 9, "b": 1}


def test_pointwise_min_of_one_peer_or_of_peers_holding_different_writers() -> None:
    assert fsic.pointwise_min([{"a": 3}]) == {"a": 3}
    assert fsic.pointwise_min([{"a": 1}, {"a": 2, "b": 1}]) == {"a": 1}


def test_missing_is_empty_where_the_basis_is_held() -> None:
    assert fsic.missing({"a": 5, "b": 7}, {"a": 5, "b": 2}) == {}
    assert fsic.missing({"a": 5}, {"a": 5, "c": 2}) == {"c": (0, 2)}
