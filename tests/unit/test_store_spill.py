"""The store's spill bookkeeping (store.ObjectStore) fed events, moves run by hand.

No processes, sockets or sleeps: segments are files in tmp directories, a Move is run
with spill.spill_file/restore_file when the test says so, and readers are real mappings
(read_segment), so "a reader maps it" is the same lock the agent sees in production.
"""

import fcntl
import os

import numpy as np
import pytest

from farpool._private import segments, spill, store
from farpool._private.store import State

MB = 1 << 20


class Waiter:
    def __init__(self):
        self.answers = []

    def __call__(self, seg, error, full):
        self.answers.append((seg, error, full))

    @property
    def seg(self):
        assert len(self.answers) == 1, self.answers
        return self.answers[0][0]


@pytest.fixture
def st(tmp_path):
    (tmp_path / "shm").mkdir()
    return store.ObjectStore(str(tmp_path / "shm"), 6 * MB, str(tmp_path / "spill"))


def answer(acts):
    """Do what the agent does with StoreActions, but the moves (the test runs those)."""
    for waiter, seg, error, full in acts.answers:
        waiter(seg, error, full)
    for path in acts.removals:
        os.unlink(path)
    return acts


def run(move):
    try:
        (spill.spill_file if move.kind == spill.SPILL else spill.restore_file)(move)
        return None
    except OSError as exc:
        return exc


def put(st, oid: bytes, fill: int, mb: int = 3):
    """Allocate and write an object of ``mb`` MB (its moves must be run by the test)."""
    array = np.full(mb * MB // 8 - 64, fill, dtype=np.float64)
    size = segments.value_size(b"p", [array])
    w = Waiter()
    acts = answer(st.allocate(w, oid, size))
    return w, acts, (lambda: segments.write_segment(w.seg.path, b"p", [array], oid)), size


def value(seg, size, oid):
    _, buffers = segments.read_segment(seg.path, size, store_id=oid)
    return np.frombuffer(buffers[0], dtype=np.float64)


def a_spilled_for_b(st):
    """"a" written, then "b": "a" spills to make room, "b" gets its memory and is written.
    Returns b's waiter and the objects' size."""
    _, _, write1, size = put(st, b"a", 1)
    write1()
    w2, acts, write2, _ = put(st, b"b", 2)
    (move,) = acts.moves
    answer(st.move_done(move, run(move)))
    write2()
    return w2, size


def test_a_request_waits_for_a_spill_then_the_spilled_object_comes_back(st):
    w1, acts, write1, size = put(st, b"a", 1)
    assert acts.moves == []
    write1()
    w2, acts, write2, _ = put(st, b"b", 2)
    assert w2.answers == []                                  # waits: no room yet
    (move,) = acts.moves
    assert (move.kind, move.object_id) == (spill.SPILL, b"a")
    assert st.objects[b"a"].state is State.SPILLING
    assert value(st.objects[b"a"], size, b"a")[0] == 1       # still readable while it spills
    answer(st.move_done(move, run(move)))
    assert st.objects[b"a"].state is State.SPILLED
    assert w2.seg.path == w1.seg.path  # its memory went straight to the request that waited
    write2()
    with pytest.raises(FileNotFoundError):  # a reader with the old location asks for a restore
        value(w1.seg, size, b"a")
    # Bring "a" back: "b" has to spill first; two readers ask, one restore serves both.
    r1, r2 = Waiter(), Waiter()
    acts = answer(st.restore(r1, b"a"))
    (spill_b,) = acts.moves
    assert spill_b.object_id == b"b" and r1.answers == []
    answer(st.restore(r2, b"a"))
    acts = answer(st.move_done(spill_b, run(spill_b)))
    (restore_a,) = acts.moves
    assert restore_a.kind == spill.RESTORE and st.objects[b"a"].state is State.RESTORING
    assert r1.answers == r2.answers == []                   # readers wait for the whole object
    answer(st.move_done(restore_a, run(restore_a)))
    assert st.objects[b"a"].state is State.IN_MEMORY
    assert value(r1.seg, size, b"a")[-1] == 1 and r2.seg is r1.seg
    # a's spill file stays while "a" lives: a clean copy, so evicting it again writes nothing,
    # once its readers had their time to map it (store.READER_GRACE_S)
    assert sorted(os.listdir(st.spill_dir)) == [b"a".hex(), b"b".hex()]
    st.objects[b"a"].handed_at -= store.READER_RETRY_GRACE_S
    w3 = Waiter()
    acts = answer(st.allocate(w3, b"c", size))
    assert acts.moves == [] and st.objects[b"a"].state is State.SPILLED and w3.seg is not None
    answer(st.free_object(b"a"))
    assert sorted(os.listdir(st.spill_dir)) == [b"b".hex()]


def test_an_object_mapped_by_a_reader_while_it_spills_stays_in_memory(st):
    w1, _, write1, size = put(st, b"a", 1)
    write1()
    w2, acts, _, _ = put(st, b"b", 2)
    (move,) = acts.moves
    view = value(w1.seg, size, b"a")                          # a reader maps it mid-spill
    answer(st.move_done(move, run(move)))
    assert st.objects[b"a"].state is State.IN_MEMORY and view[7] == 1
    assert sorted(os.listdir(st.spill_dir)) == [b"a".hex(), f"fallback-{b'b'.hex()}"]  # a clean copy
    # Nothing else can spill: "b" lives in a file of the spill directory, counted as such.
    assert w2.seg.state is State.ON_DISK and st.stats()["on_disk"] == w2.seg.used
    assert st.counts["on_disk_allocations"] == 1


def test_an_object_freed_while_it_spills_is_dropped_when_the_spill_ends(st):
    _, _, write1, _ = put(st, b"a", 1)
    write1()
    w2, acts, _, _ = put(st, b"b", 2)
    (move,) = acts.moves
    answer(st.free_object(b"a"))
    assert b"a" not in st.objects and w2.answers == []
    answer(st.move_done(move, run(move)))
    assert w2.seg.state is State.IN_MEMORY                    # granted from the freed memory
    assert os.listdir(st.spill_dir) == []


def test_an_object_freed_while_it_is_restored_answers_its_readers_that_it_was_freed(st):
    _, _, write1, _ = put(st, b"a", 1)
    write1()
    _, acts, _, _ = put(st, b"b", 2)
    (move,) = acts.moves
    answer(st.move_done(move, run(move)))
    answer(st.free_object(b"b"))                              # room again
    reader = Waiter()
    (restore,) = answer(st.restore(reader, b"a")).moves
    answer(st.free_object(b"a"))
    answer(st.move_done(restore, run(restore)))
    assert reader.answers == [(None, "it was freed", False)]
    assert os.listdir(st.spill_dir) == [] and st.objects == {}


def test_a_segment_not_written_yet_is_never_spilled(st):
    put(st, b"a", 1)                                          # allocated, its writer not done
    w2, acts, _, _ = put(st, b"b", 2)
    assert acts.moves == [] and w2.seg.state is State.ON_DISK


def test_a_failed_spill_keeps_the_object_in_memory(st, tmp_path):
    _, _, write1, size = put(st, b"a", 1)
    write1()
    w2, acts, _, _ = put(st, b"b", 2)
    (move,) = acts.moves
    answer(st.move_done(move, OSError(28, "No space left on device")))
    assert st.objects[b"a"].state is State.IN_MEMORY and value(st.objects[b"a"], size, b"a")[0] == 1
    assert w2.seg.state is State.ON_DISK  # no other candidate: on disk, nothing lost
    assert st.counts["spill_failures"] == 1


def test_an_object_larger_than_the_store_is_refused_with_the_sizes(st):
    w = Waiter()
    answer(st.allocate(w, b"big", 9 * MB))
    ((seg, error, full),) = w.answers
    assert seg is None and full
    assert "9.4 MB is larger than the whole object store (6.3 MB); raise object_store_memory" in error


def test_no_room_in_memory_nor_on_disk_names_the_spill_directory(tmp_path):
    (tmp_path / "shm").mkdir()
    (tmp_path / "not-a-dir").write_text("")
    st = store.ObjectStore(str(tmp_path / "shm"), 6 * MB, str(tmp_path / "not-a-dir"))
    w1, _, write1, _ = put(st, b"a", 1)
    write1()
    w2, acts, _, _ = put(st, b"b", 2)
    assert acts.moves == []   # the spill directory cannot hold it: nothing to spill to
    ((seg, error, full),) = w2.answers
    assert seg is None and full
    assert f"the spill directory {tmp_path / 'not-a-dir'} has" in error and "Nothing was lost" in error
    assert st.objects[b"a"].state is State.IN_MEMORY


def test_a_segment_sent_in_pieces_reads_back_as_the_value(tmp_path):
    """What a driver on another machine sends to fill a segment (segments.pieces), put
    together at the offsets given, is the segment write_segment makes."""
    import numpy as np
    from farpool._private import protocol
    value = {"a": np.arange(300_000, dtype=np.float64), "b": np.ones(70_000, dtype=np.uint8), "c": "small"}
    payload, buffers = protocol.dumps(value, what="a test value")
    size = segments.value_size(payload, buffers)
    whole = bytearray(size)
    pieces = segments.pieces(payload, buffers, b"sid", 64 * 1024)
    assert all(len(p) <= 64 * 1024 for _, p in pieces) and len(pieces) > size // (64 * 1024)
    for offset, piece in pieces:
        whole[offset:offset + len(piece)] = piece
    back = protocol.loads(*segments.parse(memoryview(whole)))
    assert np.array_equal(back["a"], value["a"]) and np.array_equal(back["b"], value["b"]) and back["c"] == "small"
    path = tmp_path / "seg"
    path.write_bytes(bytes(size))
    segments.write_segment(str(path), payload, buffers, b"sid")
    written = path.read_bytes()
    for offset, piece in pieces:  # the same bytes where write_segment puts them
        assert written[offset:offset + len(piece)] == bytes(piece)


def test_an_object_handed_to_a_reader_is_not_spilled_before_the_reader_can_map_it(st, monkeypatch):
    """A store short of memory used to evict a just-restored object again before its reader
    mapped it (nothing marks a segment in use until then): the reader found it gone each time
    it asked.  For a while (store.READER_GRACE_S) it stays; a request that needs its room goes
    on disk."""
    monkeypatch.setattr(store, "READER_GRACE_S", 3600.0)  # (no clock in the test: the grace never ends)
    _, size = a_spilled_for_b(st)
    r = Waiter()
    acts = answer(st.restore(r, b"a"))             # "b" spills to make room for "a"
    (spill_b,) = acts.moves
    acts = answer(st.move_done(spill_b, run(spill_b)))
    (restore_a,) = acts.moves
    answer(st.move_done(restore_a, run(restore_a)))
    assert st.objects[b"a"].state is State.IN_MEMORY and r.seg is not None
    # Before the reader maps "a", another object needs all the room: "a" is not the one to go.
    w3 = Waiter()
    answer(st.allocate(w3, b"c", 5 * MB))
    assert st.objects[b"a"].state is State.IN_MEMORY
    assert value(r.seg, size, b"a")[-1] == 1        # the reader finds it


def test_a_spilled_object_that_cannot_come_back_is_read_from_its_spill_file(st):
    """Restoring needs room that spilling cannot make (a reader maps the only other object):
    the spilled object is served from its spill file, where it already is, and no restore runs."""
    w2, size = a_spilled_for_b(st)
    view = value(w2.seg, size, b"b")  # "b" is mapped: it cannot spill
    r = Waiter()
    acts = answer(st.restore(r, b"a"))
    assert acts.moves == [] and st.objects[b"a"].state is State.ON_DISK
    assert os.path.dirname(r.seg.path) == st.spill_dir and value(r.seg, size, b"a")[-1] == 1
    assert st.counts["restores"] == 0 and st.stats()["on_disk"] == r.seg.used and view[0] == 2


def test_a_reader_with_a_stale_location_lets_go_without_locking_the_segment(st, monkeypatch):
    """A location kept after its object spilled names a segment that holds another object
    now: the reader sees it before locking, so it never keeps the agent from reusing that
    segment for the restore it asks for next (a lock held at that moment sent the object
    to its spill file instead, and the readers to the disk)."""
    w2, size = a_spilled_for_b(st)  # "b" went into a's old segment
    answer(st.free_object(b"b"))
    taken = []
    flock = fcntl.flock
    monkeypatch.setattr(fcntl, "flock", lambda fd, op: (taken.append(op), flock(fd, op))[1])
    with pytest.raises(segments.SegmentReused):
        segments.read_segment(w2.seg.path, size, store_id=b"a")  # a's old location
    assert taken == []
    monkeypatch.undo()
    r = Waiter()
    acts = answer(st.restore(r, b"a"))
    (move,) = acts.moves
    assert move.kind == spill.RESTORE and move.target == w2.seg.path  # the freed segment, reused
    answer(st.move_done(move, run(move)))
    assert st.counts["restores"] == 1 and value(r.seg, size, b"a")[-1] == 1
