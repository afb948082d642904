"""The linearizability checker: known-good and known-bad histories, timeouts, budgets, lost writes."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.sim.lincheck import Operation, check, lost_acknowledged_writes

INF = math.inf


def op(kind, key, inp=None, out=None, call=0, ret=INF, client="c"):
    return Operation(client, kind, key, inp, out, call, ret)


def put(key, value, call, ret, client="w"):
    return op("put", key, value, None, call, ret, client)


def get(key, value, call, ret, client="r"):
    return op("get", key, None, value, call, ret, client)


def cas(key, expected, new, swapped, call, ret, client="x"):
    return op("cas", key, (expected, new), swapped, call, ret, client)


def delete(key, existed, call, ret, client="d"):
    return op("del", key, None, existed, call, ret, client)


# ------------------------------------------------------------ linearizable


def test_empty_history_is_linearizable():
    assert check([]).ok is True


def test_sequential_history():
    h = [put("x", 1, 0, 1), get("x", 1, 2, 3), put("x", 2, 4, 5), get("x", 2, 6, 7), get("y", None, 0, 1)]
    assert check(h).ok is True


@pytest.mark.parametrize("seen", [None, 1])
def test_a_read_concurrent_with_a_write_may_see_either(seen):
    assert check([put("x", 1, 0, 10), get("x", seen, 5, 6)]).ok is True


def test_concurrent_writes_may_land_in_either_order():
    h = [put("x", 1, 0, 10, "a"), put("x", 2, 0, 10, "b"), get("x", 1, 11, 12), get("x", 1, 13, 14)]
    assert check(h).ok is True
    h = [put("x", 1, 0, 10, "a"), put("x", 2, 0, 10, "b"), get("x", 2, 11, 12)]
    assert check(h).ok is True


def test_reads_during_a_write_switch_once():
    h = [put("x", 1, 0, 100), get("x", None, 1, 2), get("x", 1, 3, 4), get("x", 1, 5, 6)]
    assert check(h).ok is True


def test_equal_times_count_as_concurrent():
    assert check([put("x", 1, 0, 5), get("x", None, 5, 6)]).ok is True


def test_cas_and_delete_semantics():
    h = [
        cas("x", None, 1, True, 0, 1),
        cas("x", None, 9, False, 2, 3),
        cas("x", 1, 2, True, 4, 5),
        delete("x", True, 6, 7),
        delete("x", False, 8, 9),
        get("x", None, 10, 11),
        cas("x", None, 3, None, 12, 13),  # output unchecked
        get("x", 3, 14, 15),
    ]
    assert check(h).ok is True


def test_initial_state():
    assert check([get("x", "boot", 0, 1)], initial={"x": "boot"}).ok is True
    assert check([get("x", "boot", 0, 1)]).ok is False


# -------------------------------------------------------- not linearizable


def test_stale_read_after_acknowledged_write():
    h = [put("x", 1, 0, 1), get("x", None, 2, 3)]
    v = check(h)
    assert v.ok is False and v.key_failing == "x"
    assert set(v.witness) == set(h)
    assert "'x'" in v.explanation and "put('x', 1)" in v.explanation


def test_lost_write_read_returns_the_overwritten_value():
    h = [put("x", 1, 0, 1), put("x", 2, 2, 3), get("x", 1, 4, 5)]
    assert check(h).ok is False


def test_reads_going_back_in_time():
    # the write is still in flight, but once a read saw it a later read cannot unsee it
    h = [put("x", 1, 0, 100, "w"), get("x", 1, 10, 20, "a"), get("x", None, 30, 40, "b")]
    v = check(h)
    assert v.ok is False and v.key_failing == "x"


def test_read_of_a_value_nobody_wrote():
    assert check([put("x", 1, 0, 1), get("x", 7, 0, 5)]).ok is False


def test_wrong_cas_outputs_are_caught():
    assert check([put("x", 1, 0, 1), cas("x", 1, 2, False, 2, 3)]).ok is False
    assert check([cas("x", 1, 2, True, 0, 1)]).ok is False
    assert check([cas("x", None, 1, True, 0, 1), cas("x", None, 2, True, 2, 3)]).ok is False
    assert check([put("x", 1, 0, 1), delete("x", False, 2, 3)]).ok is False


def test_only_the_failing_key_is_blamed():
    good = [put("a", 1, 0, 1), get("a", 1, 2, 3), put("c", 5, 0, 9), get("c", None, 1, 2)]
    bad = [put("b", 1, 0, 1), get("b", None, 2, 3)]
    v = check(good + bad)
    assert v.ok is False and v.key_failing == "b"
    assert all(o.key == "b" for o in v.witness)


def test_witness_drops_observations_that_do_not_matter():
    noise = [get("x", 1, 10 + 2 * i, 11 + 2 * i, f"r{i}") for i in range(10)]
    h = [put("x", 1, 0, 1)] + noise + [put("x", 2, 40, 41), get("x", 1, 50, 51, "late")]
    v = check(h)
    assert v.ok is False
    assert sorted(str(o) for o in v.witness) == sorted(str(o) for o in [h[0], h[-2], h[-1]])
    assert "Witness, 3 operation(s)" in v.explanation
    assert check(v.witness).ok is False, "the witness fails on its own"


# ---------------------------------------------------------------- timeouts


def test_a_timed_out_write_may_have_taken_effect():
    h = [put("x", 1, 0, INF), get("x", 1, 5, 6)]
    assert check(h).ok is True


def test_a_timed_out_write_may_never_have_taken_effect():
    h = [put("x", 1, 0, INF), get("x", None, 5, 6), get("x", None, 50, 60)]
    assert check(h).ok is True


def test_a_timed_out_write_may_take_effect_late():
    h = [put("x", 1, 0, INF), get("x", None, 5, 6), get("x", 1, 50, 60)]
    assert check(h).ok is True


def test_a_timed_out_write_cannot_be_undone_once_seen():
    h = [put("x", 1, 0, INF), get("x", 1, 5, 6), get("x", None, 50, 60)]
    assert check(h).ok is False


def test_a_timed_out_write_cannot_take_effect_before_its_call():
    h = [get("x", 1, 0, 1), put("x", 1, 5, INF)]
    assert check(h).ok is False


def test_timed_out_cas_and_delete_and_reads():
    h = [put("x", 1, 0, 1), cas("x", 1, 2, False, 2, INF), get("x", 2, 10, 11)]
    assert check(h).ok is True, "a timed-out op's output is unknown, whatever was recorded"
    h = [put("x", 1, 0, 1), delete("x", None, 2, INF), get("x", None, 10, 11), get("x", 1, 12, 13)]
    assert check(h).ok is False, "deleted, then back without a write"
    assert check([get("x", 42, 0, INF)]).ok is True, "a timed-out read constrains nothing"


# ------------------------------------------------------------------- budget


def test_search_budget_gives_unknown_instead_of_running_forever():
    # 16 concurrent writes and a read of a value nobody wrote: refuting it
    # means visiting every subset of the writes.
    h = [put("x", i, 0, 100, f"c{i}") for i in range(16)] + [get("x", "never", 200, 201)]
    v = check(h, budget=2_000)
    assert v.ok is None and v.unknown_keys == ("x",)
    assert "budget" in v.explanation
    other = check(h + [put("y", 1, 0, 1), get("y", None, 2, 3)], budget=2_000)
    assert other.ok is False and other.key_failing == "y", "a definite failure beats unknown"


def test_verdict_is_not_a_bool():
    with pytest.raises(TypeError):
        bool(check([]))


def test_operation_validation():
    with pytest.raises(ValueError):
        op("inc", "x")
    with pytest.raises(ValueError):
        op("put", "x", 1, None, 5, 4)
    with pytest.raises(ValueError):
        op("put", "x", None, None, 0, 1)
    with pytest.raises(ValueError):
        op("cas", "x", 1, True, 0, 1)
    with pytest.raises(TypeError):
        op("put", "x", [1], None, 0, 1)  # unhashable value
    assert op("cas", "x", [None, 1], True, 0, 1).input == (None, 1)


# ------------------------------------------------------------- lost writes


def test_lost_acknowledged_writes():
    h = [
        put("a", 1, 0, 1),  # overwritten by the later put: not lost
        put("a", 2, 2, 3),  # the last write of a, absent from the final state: lost
        put("b", 1, 0, 1),  # in the final state
        put("c", 1, 0, 10),  # concurrent with another write: either may be last
        put("c", 2, 5, 6),
        put("d", 1, 0, 1),  # a later timed-out write may have overwritten it
        put("d", 2, 5, INF),
        put("e", 1, 0, 1),  # a later failed cas does not excuse it
        cas("e", 7, 8, False, 5, 6),
        delete("f", True, 0, 1),  # acknowledged delete, but the key is back
        put("g", 1, 0, INF),  # never acknowledged: cannot be lost
    ]
    final = {"a": 1, "b": 1, "c": 1, "d": 2, "e": 3, "f": 9}
    lost = lost_acknowledged_writes(h, final)
    assert lost == [h[7], h[9], h[1]], "by call time"
    assert lost_acknowledged_writes(h, {"a": 2, "b": 1, "c": 2, "d": 1, "e": 1}) == []


# --------------------------------------------------------------- properties

KEYS = ["x", "y"]


@st.composite
def sequential_histories(draw, max_ops=24):
    """Run random operations one at a time on a dict at times 10, 20, 30...,
    then give each a call time before and a return time after its moment
    (overlapping neighbours freely), or make it time out; some timed-out
    writes never take effect at all."""
    n = draw(st.integers(1, max_ops))
    state = {}
    history = []
    for i in range(n):
        at = 10 * (i + 1)
        key = draw(st.sampled_from(KEYS))
        kind = draw(st.sampled_from(["put", "put", "get", "get", "cas", "del"]))
        call = at - draw(st.integers(0, 40))
        timed_out = draw(st.integers(0, 9)) == 0
        ret = INF if timed_out else at + draw(st.integers(0, 40))
        applied = not (timed_out and draw(st.booleans()))  # lost on the way: no effect
        current = state.get(key)
        if kind == "put":
            value = draw(st.integers(0, 3))
            if applied:
                state[key] = value
            history.append(op("put", key, value, None, call, ret, i))
        elif kind == "get":
            history.append(op("get", key, None, current, call, ret, i))
        elif kind == "cas":
            expected = draw(st.sampled_from([current, None, 0, 1]))
            new = draw(st.integers(0, 3))
            hit = current == expected
            if hit and applied:
                state[key] = new
            history.append(op("cas", key, (expected, new), hit, call, ret, i))
        else:
            if applied:
                state.pop(key, None)
            history.append(op("del", key, None, current is not None, call, ret, i))
    return history, state


@settings(max_examples=300, deadline=None)
@given(sequential_histories())
def test_histories_from_a_sequential_execution_are_linearizable(case):
    history, _ = case
    v = check(history)
    assert v.ok is True, v.explanation


@settings(max_examples=200, deadline=None)
@given(sequential_histories(), st.data())
def test_a_wrong_read_in_a_strictly_sequential_history_is_caught(case, data):
    """Without overlap there is one order only, so any other read output is wrong."""
    history, _ = case
    seq = []
    for i, o in enumerate(history):
        if o.timed_out:
            continue  # a pending op could excuse the read
        seq.append(Operation(o.client, o.op, o.key, o.input, o.output, 10 * i, 10 * i + 5))
    reads = [i for i, o in enumerate(seq) if o.op == "get"]
    if not reads:
        return
    i = data.draw(st.sampled_from(reads))
    wrong = data.draw(st.sampled_from([None, 0, 1, 2, 3, 99]).filter(lambda w: w != seq[i].output))
    o = seq[i]
    seq[i] = Operation(o.client, "get", o.key, None, wrong, o.call_time, o.return_time)
    assert check(seq).ok is _consistent(seq)


def _consistent(seq):
    """Replay a strictly sequential history (the one possible order)."""
    state = {}
    for o in seq:
        cur = state.get(o.key)
        if o.op == "put":
            state[o.key] = o.input
        elif o.op == "get" and o.output != cur:
            return False
        elif o.op == "cas":
            if o.output is not None and o.output != (cur == o.input[0]):
                return False
            if cur == o.input[0]:
                state[o.key] = o.input[1]
        elif o.op == "del":
            if o.output is not None and o.output != (cur is not None):
                return False
            state.pop(o.key, None)
    return True


@settings(max_examples=100, deadline=None)
@given(sequential_histories())
def test_no_lost_writes_in_a_correct_execution(case):
    history, final = case
    assert lost_acknowledged_writes(history, final) == []


def _brute_force(history):
    """Try every order that respects real time (a before b when a returned
    before b was called); tiny histories only."""
    from itertools import permutations

    from agent.sim.lincheck import _step

    for order in permutations(history):
        if any(b.return_time < a.call_time for i, a in enumerate(order) for b in order[i + 1 :]):
            continue
        state, ok = None, True
        for o in order:
            if o.op == "get" and o.timed_out:
                continue
            ok, state = _step(state, o.op, o.input, o.output, not o.timed_out)
            if not ok:
                break
        if ok:
            return True
    return False


@st.composite
def arbitrary_histories(draw):
    """Any small history on one key: outputs drawn at random, so most are wrong."""
    out = []
    for i in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["put", "get", "cas", "del"]))
        call = draw(st.integers(0, 12))
        ret = INF if draw(st.integers(0, 5)) == 0 else call + draw(st.integers(0, 8))
        value = draw(st.sampled_from([None, 1, 2]))
        if kind == "put":
            out.append(op("put", "x", value or 1, None, call, ret, i))
        elif kind == "get":
            out.append(op("get", "x", None, value, call, ret, i))
        elif kind == "cas":
            out.append(op("cas", "x", (value, draw(st.sampled_from([1, 2]))), draw(st.sampled_from([True, False, None])), call, ret, i))
        else:
            out.append(op("del", "x", None, draw(st.sampled_from([True, False, None])), call, ret, i))
    return out


@settings(max_examples=400, deadline=None)
@given(arbitrary_histories())
def test_search_agrees_with_brute_force_on_small_histories(history):
    v = check(history)
    assert v.ok is _brute_force(history), v.explanation
    if v.ok is False:
        assert _brute_force(list(v.witness)) is False, "the witness must fail on its own"
