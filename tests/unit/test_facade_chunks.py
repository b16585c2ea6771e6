"""A map chunk's inputs and results on their way (facades, no processes): inputs read from a
list by slicing, results pickled by the worker with a note that no array is inside."""

import itertools
import pickle

import numpy as np
import pytest

from farpool._facade import tasks
from farpool._facade.dispatcher import _Feed, _Limit


def _feed(inputs, chunksize, star=False):
    return _Feed(None, None, len, inputs, chunksize, star, _Limit(2, 2))


@pytest.mark.parametrize("star", [False, True])
def test_a_list_is_read_in_the_same_chunks_as_its_iterator(star):
    items = [(i, -i) for i in range(10)] if star else list(range(10))
    sliced, iterated = _feed(items, 4, star), _feed(iter(items), 4, star)
    assert sliced.items is items and iterated.items is None
    for want in (4, 4, 8):
        a, b = sliced._read(want), iterated._read(want)
        assert a == b and all(type(x) is tuple for x in a) == star
    assert sliced._read(4) == [] and sliced.position == 10
    assert items == ([(i, -i) for i in range(10)] if star else list(range(10)))  # never changed


MANY = tasks.PACK_MIN_RESULTS


def test_plain_results_travel_pickled_with_no_look_at_each_item():
    results = [1, "a", (2.0, None)] * MANY
    packed = tasks._packed(results)
    assert type(packed) is tasks._Packed and packed.plain
    again = pickle.loads(pickle.dumps(packed, protocol=5))
    assert tasks._fix_result(again, chunk=True) == results
    assert tasks._packed(results[:MANY - 1]) == results[:MANY - 1]  # a few: as they are


@pytest.mark.parametrize("many", [True, False])
def test_results_with_arrays_arrive_writable(many):
    frozen = np.arange(4.0)
    frozen.flags.writeable = False
    packed = tasks._packed([frozen, np.ones(3)] + [7] * (MANY if many else 1))
    assert (type(packed) is tasks._Packed and not packed.plain) == many
    out = tasks._fix_result(pickle.loads(pickle.dumps(packed, protocol=5)), chunk=True)
    assert [a.flags.writeable for a in out[:2]] == [True, True] and out[2] == 7
    assert out[0].tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("results", [
    [np.zeros(100_000)],           # a large buffer: the runtime sends it out of band
    [lambda: 1],                   # plain pickle cannot: the runtime's cloudpickle can
], ids=["large-buffer", "lambda"])
def test_what_needs_the_runtime_goes_as_the_list_itself(results):
    assert tasks._packed(results) is results


def test_results_that_do_not_unpickle_say_where():
    packed = tasks._Packed(True, pickle.dumps([1, 2])[:-3])
    with pytest.raises(Exception) as info:
        tasks._fix_result(packed, chunk=True)
    assert any("unpickling the results of a chunk" in note for note in info.value.__notes__)


def frozen_or_fail(x):
    if x == 3:
        raise KeyError(x)
    arr = np.full(2, float(x))
    arr.flags.writeable = False
    return arr


@pytest.mark.parametrize("n", [5, MANY + 1])
def test_a_group_of_chunks_travels_as_one_and_each_chunk_keeps_its_outcome(n):
    out = tasks._run_chunks(None, abs, False, True, 2, list(range(-n, 0)))
    assert (type(out) is tasks._Packed) == (n > MANY)
    fixed = tasks._fix_result(pickle.loads(pickle.dumps(out, protocol=5)), chunk=True)
    assert type(fixed) is tasks._Grouped
    assert list(itertools.chain.from_iterable(fixed)) == list(range(n, 0, -1))
    out = tasks._run_chunks(None, frozen_or_fail, False, True, 2, list(range(n)))
    fixed = tasks._fix_result(pickle.loads(pickle.dumps(out, protocol=5)), chunk=True)
    assert type(fixed[1]) is tasks._ChunkFailed and fixed[1].type_name == "KeyError"  # the chunk [2, 3]
    arrays = [a for part in fixed if type(part) is not tasks._ChunkFailed for a in part]
    assert len(arrays) == n - 2 and all(a.flags.writeable for a in arrays)
