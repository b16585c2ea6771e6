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


def test_plain_results_travel_pickled_with_no_look_at_each_item():
    packed = tasks._packed([1, "a", (2.0, None)])
    assert type(packed) is tasks._Packed and packed.plain
    again = pickle.loads(pickle.dumps(packed, protocol=5))
    assert tasks._fix_result(again, chunk=True) == [1, "a", (2.0, None)]


def test_results_with_arrays_arrive_writable():
    frozen = np.arange(4.0)
    frozen.flags.writeable = False
    packed = tasks._packed([frozen, np.ones(3), 7])
    assert type(packed) is tasks._Packed and not packed.plain
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


def test_grouped_chunks_are_packed_each():
    out = tasks._run_chunks(None, abs, False, True, 2, [-1, -2, -3])
    assert [tasks._fix_result(part, chunk=True) for part in out] == [[1, 2], [3]]
    assert list(itertools.chain.from_iterable(tasks._fix_result(p, chunk=True) for p in out)) == [1, 2, 3]
