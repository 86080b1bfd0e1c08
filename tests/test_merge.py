"""The merge rule: classification of the five cases, and join properties (hypothesis)."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from bundlesync.format.records import Version
from bundlesync.replica.merge import Outcome, merge, merge_vectors


def v(inst: str, ctr: int, hlc: int, vv: dict[str, int], data: str = "{}", deleted: bool = False,
      purged: bool = False) -> Version:
    return Version("t", "r1", "d:p", data, deleted, purged, hlc, inst, ctr, vv)


def test_new_record_is_taken() -> None:
    incoming = v("a", 1, 10, {"a": 1})
    m = merge(None, incoming)
    assert m.outcome is Outcome.NEW and m.result == incoming and m.incoming_won


def test_fast_forward_replaces_local() -> None:
    local = v("a", 1, 10, {"a": 1}, '{"x":1}')
    incoming = v("b", 1, 20, {"a": 1, "b": 1}, '{"x":2}')
    m = merge(local, incoming)
    assert m.outcome is Outcome.FAST_FORWARD
    assert m.result.data == '{"x":2}' and m.result.vv == {"a": 1, "b": 1} and m.loser is None


def test_stale_duplicate_changes_nothing() -> None:
    local = v("b", 1, 20, {"a": 1, "b": 1}, '{"x":2}')
    older = v("a", 1, 10, {"a": 1}, '{"x":1}')
    m = merge(local, older)
    assert m.outcome is Outcome.ALREADY and m.result == local and not m.incoming_won
    assert merge(local, local).outcome is Outcome.ALREADY


def test_concurrent_edits_pick_higher_clock_and_keep_loser() -> None:
    left = v("a", 2, 30, {"a": 2}, '{"x":"left"}')
    right = v("b", 1, 40, {"a": 1, "b": 1}, '{"x":"right"}')
    m1, m2 = merge(left, right), merge(right, left)
    assert m1.outcome is m2.outcome is Outcome.CONFLICT
    assert m1.result == m2.result and m1.result.data == '{"x":"right"}'
    assert m1.result.vv == {"a": 2, "b": 1}
    assert m1.loser is not None and m1.loser.data == '{"x":"left"}'
    assert m2.loser is not None and m2.loser.data == '{"x":"left"}'


def test_equal_clocks_break_ties_by_instance() -> None:
    left, right = v("a", 1, 50, {"a": 1}, "L"), v("b", 1, 50, {"b": 1}, "R")
    assert merge(left, right).result.data == "R" == merge(right, left).result.data


def test_delete_versus_concurrent_update_latest_wins() -> None:
    update = v("a", 2, 100, {"a": 2}, '{"x":9}')
    delete = v("b", 1, 90, {"a": 1, "b": 1}, '{"x":1}', deleted=True)
    assert merge(update, delete).result.deleted is False
    assert merge(delete, update).result.deleted is False
    later_delete = v("b", 1, 110, {"a": 1, "b": 1}, '{"x":1}', deleted=True)
    assert merge(update, later_delete).result.deleted is True
    assert merge(later_delete, update).result.deleted is True


def test_purge_beats_everything_even_a_later_edit() -> None:
    purge = v("a", 3, 10, {"a": 3}, "{}", purged=True)
    edit = v("b", 5, 10_000, {"a": 3, "b": 5}, '{"x":1}')
    assert merge(purge, edit).result.purged and merge(edit, purge).result.purged
    assert merge(purge, edit).outcome is Outcome.PURGE_KEPT


# --- join properties over simulated histories ---------------------------------------------

INSTANCES = ["a", "b", "c"]


@st.composite
def histories(draw: st.DrawFn) -> list[Version]:
    """Versions of one record produced by three replicas editing and exchanging at random."""
    states: dict[str, Version | None] = {i: None for i in INSTANCES}
    counters = {i: 0 for i in INSTANCES}
    produced: list[Version] = []
    clock = 0
    for _ in range(draw(st.integers(1, 12))):
        actor = draw(st.sampled_from(INSTANCES))
        if draw(st.booleans()) and produced:
            got = draw(st.sampled_from(produced))
            current = states[actor]
            states[actor] = got if current is None else merge(current, got).result
            continue
        clock += draw(st.integers(0, 3))
        counters[actor] += 1
        base = states[actor]
        vv = dict(base.vv) if base else {}
        vv[actor] = counters[actor]
        hlc = max(clock, base.hlc + 1 if base else 0)
        new = Version("t", "r1", "d:p", f'{{"n":{len(produced)}}}', draw(st.booleans()),
                      draw(st.integers(0, 15)) == 0, hlc, actor, counters[actor], vv)
        states[actor] = new if base is None else merge(base, new).result
        produced.append(new)
    return produced


def fold(versions: list[Version]) -> Version:
    state: Version | None = None
    for version in versions:
        state = version if state is None else merge(state, version).result
    assert state is not None
    return state


@settings(max_examples=300, deadline=None)
@given(histories(), st.randoms())
def test_any_delivery_order_and_duplicates_converge(history: list[Version], rnd: object) -> None:
    reference = fold(history)
    shuffled = list(history) * 2
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert fold(shuffled) == reference
    assert reference.key() == max(x.key() for x in history)


@settings(max_examples=200, deadline=None)
@given(histories())
def test_merge_is_associative_and_commutative(history: list[Version]) -> None:
    for a, b, c in itertools.islice(itertools.permutations(history, 3), 30):
        ab_c = merge(merge(a, b).result, c).result
        a_bc = merge(a, merge(b, c).result).result
        assert ab_c == a_bc
        assert merge(a, b).result == merge(b, a).result


def test_a_version_met_again_is_not_applied_again() -> None:
    """The same version twice (a bundle imported again): nothing to write, whoever delivers it."""
    version = v("a", 2, 30, {"a": 2, "b": 1}, '{"x":1}')
    again = merge(version, version)
    assert again.outcome is Outcome.ALREADY and not again.incoming_won and again.result is version


def test_a_write_restamped_with_a_later_clock_wins_in_either_order() -> None:
    """Two copies of one write (same instance and counter) that differ in clock: the later one is the
    join whichever arrives first, and the flag says to write it when it arrives second."""
    early, late = v("a", 1, 10, {"a": 1}, '{"x":"early"}'), v("a", 1, 20, {"a": 1}, '{"x":"late"}')
    m = merge(early, late)
    assert m.outcome is Outcome.ALREADY and m.incoming_won and m.result == late
    m = merge(late, early)
    assert m.outcome is Outcome.ALREADY and not m.incoming_won and m.result == late


def test_an_incoming_version_with_an_empty_vector_is_merged() -> None:
    """A record whose vector is empty (a hostile or broken peer) joins like any other, it does not crash."""
    local = v("a", 2, 30, {"a": 2})
    m = merge(local, v("b", 1, 40, {}, '{"x":"b"}'))
    assert m.outcome is Outcome.CONFLICT and m.incoming_won and m.result.vv == {"a": 2}
    assert merge_vectors({"a": 2}, {}) == {"a": 2}


@settings(max_examples=200, deadline=None)
@given(histories())
def test_incoming_won_says_exactly_whether_the_result_is_the_incoming_version(history: list[Version]) -> None:
    """Import writes a record's row only when the flag is set: it must be set exactly when the
    incoming version is the one kept, or a device keeps a row that is not the merge's result."""
    for a, b in itertools.product(history, repeat=2):
        m = merge(a, b)
        assert m.incoming_won == (b.key() > a.key())
        assert m.result.key() == max(a.key(), b.key())
        assert (m.result.data, m.result.deleted) == ((b if m.incoming_won else a).data,
                                                     (b if m.incoming_won else a).deleted)
