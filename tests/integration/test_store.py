"""The node object store: zero-copy reads, pins, freeing, spilling, capacity."""

import gc
import mmap
import os
import signal
import time

import numpy as np
import pytest

import farpool
from farpool_testing import Gate, wait_at_gate, wait_until

MB = 1 << 20


@pytest.fixture(scope="module")
def small_store():
    farpool.shutdown()
    info = farpool.init(num_cpus=2, object_store_memory=40 * MB)
    yield info
    farpool.shutdown()


def backed_by_shared_memory(arr) -> bool:
    """Walk the array's base chain down to the buffer it views: a mapping of the store."""
    base = arr
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)


def store_stats():
    client = farpool.api._client()
    stats, listing = client.agent_request(client.home, "StoreStats", ())
    return stats, listing


def settle():
    """Let released refs reach the agent (frees travel on the I/O thread)."""
    gc.collect()
    client = farpool.api._client()
    client.loop.call_soon(client._drain_released)
    client.agent_request(client.home, "StoreStats", ())  # a round trip after the frees


@farpool.remote
def total(arr):
    return float(arr.sum()), arr.flags.writeable


@farpool.remote
def mutate_and_sum(arr):
    arr[:] = -1.0  # copy-on-write: the store's copy is untouched
    return float(arr.sum())


@farpool.remote
def make(n):
    return np.full(n, 7.0)


def test_get_is_a_zero_copy_read_only_view(small_store):
    arr = np.arange(2 * MB // 8, dtype=np.float64)
    ref = farpool.put(arr)
    out = farpool.get(ref)
    np.testing.assert_array_equal(out, arr)
    assert not out.flags.writeable
    assert backed_by_shared_memory(out)


def test_put_copies_so_later_mutation_changes_nothing(small_store):
    arr = np.ones(MB // 8)
    ref = farpool.put(arr)
    by_value = total.remote(arr)
    arr[:] = 0
    assert farpool.get(ref).sum() == MB // 8
    assert farpool.get(by_value, timeout=60) == (MB // 8, True)


def test_tasks_read_arguments_and_return_results_through_the_store(small_store):
    ref = farpool.put(np.ones(3 * MB // 8))
    # Tasks get copy-on-write views: writable, and their writes stay their own.
    assert farpool.get([total.remote(ref) for _ in range(4)], timeout=60) == [(3 * MB // 8, True)] * 4
    assert farpool.get(mutate_and_sum.remote(ref), timeout=60) == -3 * MB // 8
    assert farpool.get(total.remote(ref), timeout=60) == (3 * MB // 8, True)
    assert farpool.get(ref).sum() == 3 * MB // 8
    out = farpool.get(make.remote(MB // 8), timeout=60)
    assert out.sum() == 7.0 * (MB // 8) and backed_by_shared_memory(out)


def test_a_view_outliving_its_ref_stays_valid_while_memory_is_reused(small_store):
    ref = farpool.put(np.full(MB // 8, 3.0))
    view = farpool.get(ref)
    del ref
    settle()
    # Churn the store: freed segments are reused, but never the one still mapped.
    for i in range(20):
        farpool.get(farpool.put(np.full(MB // 8, float(i))))
    assert (view == 3.0).all()


def test_memory_comes_back_after_the_last_reference(small_store):
    # Other tests' objects may still be on their way out (a worker's borrow ends after its
    # task): count only what this test puts, by object id, never the store's total alone.
    settle()
    refs = [farpool.put(np.ones(MB // 8)) for _ in range(5)]
    mine = {ref.hex() for ref in refs}
    during, listing = store_stats()
    rows = [row for row in listing if row["object_id"] in mine]
    assert len(rows) == 5
    assert all(row["size"] >= MB and row["created_at"] == "put" for row in rows)
    del refs, rows
    settle()
    after, listing = store_stats()
    assert not mine & {row["object_id"] for row in listing}
    assert after["used"] <= during["used"] - 5 * MB


def test_spills_to_disk_over_capacity_and_restores_on_read(small_store):
    settle()
    arrays = [np.full(12 * MB // 8, float(i)) for i in range(5)]  # 60 MB into a 40 MB store
    refs = [farpool.put(a) for a in arrays]
    stats, _ = store_stats()
    assert stats["spilled"] > 0
    # This process keeps mappings of segments it wrote (fast rewrites), but never of one the
    # agent spilled or dropped: that would keep the memory the spill was meant to free.
    from farpool._private import segments
    assert segments._writer_maps.maps and all(os.path.exists(p) for p in segments._writer_maps.maps)
    for i, ref in enumerate(refs):
        assert (farpool.get(ref) == float(i)).all()


def test_object_larger_than_the_store_fails_at_once(small_store):
    with pytest.raises(farpool.ObjectStoreFullError, match="larger than the whole object store"):
        farpool.put(np.ones(50 * MB // 8))


def test_small_shm_falls_back_to_disk(tmp_path, monkeypatch, caplog):
    from farpool._private import store

    class Tiny:
        f_bavail = 10
        f_frsize = 4096
    monkeypatch.setattr(os, "statvfs", lambda path: Tiny())
    directory, in_shm = store.choose_dir(str(tmp_path), "abcdef0123", 64 * MB)
    assert not in_shm and directory.startswith(str(tmp_path))
    assert "larger /dev/shm" in caplog.text


@farpool.remote
class Keeper:
    def __init__(self):
        self.kept = None

    def keep(self, box):
        self.kept = box[0]  # a borrowed ref, stored beyond the call
        return True

    def read(self):
        return float(farpool.get(self.kept, timeout=60).sum())

    def drop(self):
        self.kept = None
        return True

    def pid(self):
        return os.getpid()

    def keep_inner(self, box):
        self.kept = farpool.get(box[0], timeout=60)[0]  # a ref found inside a borrowed value
        return True

    def identity(self):
        return farpool.api._client().identity

    def pass_on(self, other, gate):
        # We borrow self.kept (counted by its owner); the other keeper borrows it from us in
        # turn, and reports that to us: in the reply of a call we do not wait for.
        self.pending = other.keep_at_gate.remote([self.kept], gate)
        return True

    def keep_at_gate(self, box, gate):
        self.kept = box[0]
        wait_at_gate(gate)
        return True

    def give(self):
        return [self.kept]  # to our caller, who borrows it; its owner is a third party

    def take_from(self, other):
        self.kept = farpool.get(other.give.remote(), timeout=60)[0]
        return True

    def hold_lends(self):
        # A test hook: the AddBorrower we send the owner of a ref we return (naming our
        # caller) stays here until release_lends, as if it were slow to leave.
        self.held = []
        farpool.api._client().lend_returned = lambda refs, caller: self.held.append((refs, caller))
        return True

    def release_lends(self):
        client = farpool.api._client()
        del client.lend_returned
        for refs, caller in self.held:
            client.lend_returned(refs, caller)
        self.held = []
        return True


def used_bytes():
    settle()
    return store_stats()[0]["used"]


def wait_until_freed(base, what):
    """Store round trips until the store is back to ``base`` bytes (releases cross processes)."""
    deadline = time.monotonic() + 30
    while used_bytes() > base:
        assert time.monotonic() < deadline, f"{what} was never freed"


def test_a_borrower_keeps_the_object_alive_and_its_release_frees_it(small_store):
    base = used_bytes()
    ref = farpool.put(np.ones(MB // 8))
    keeper = Keeper.remote()
    assert farpool.get(keeper.keep.remote([ref]), timeout=60)
    del ref
    assert used_bytes() >= base + MB            # the actor still borrows it
    assert farpool.get(keeper.read.remote(), timeout=60) == MB // 8
    assert farpool.get(keeper.drop.remote(), timeout=60)
    wait_until_freed(base, "the borrowed object")


@farpool.remote
def put_and_return(n, value):
    return [farpool.put(np.full(n, value))]  # owned by this worker, borrowed by the caller


@farpool.remote
def hand_to(keeper, box):
    # box[0] is borrowed from the driver; the actor it goes to borrows it from us in turn
    return farpool.get(keeper.keep.remote([box[0]]), timeout=60)


def test_refs_returned_inside_a_value_live_while_the_caller_holds_them(small_store):
    base = used_bytes()
    box = farpool.get(put_and_return.remote(MB // 8, 5.0), timeout=60)
    settle()
    # The worker that owns it keeps no reference; our borrow holds it.
    assert (farpool.get(box[0], timeout=60) == 5.0).all()
    assert used_bytes() >= base + MB
    del box
    wait_until_freed(base, "an object returned inside a value")


def test_refs_inside_a_result_nobody_wants_are_freed(small_store):
    base = used_bytes()
    ref = put_and_return.remote(MB // 8, 1.0)
    farpool.wait([ref], timeout=60)
    del ref
    wait_until_freed(base, "an object inside an unwanted result")


def test_a_borrower_of_a_borrower_is_counted_by_the_owner(small_store):
    base = used_bytes()
    ref = farpool.put(np.full(MB // 8, 2.0))
    keeper = Keeper.remote()
    assert farpool.get(hand_to.remote(keeper, [ref]), timeout=60)
    del ref
    settle()
    assert used_bytes() >= base + MB  # the actor got it from a task, not from us: still counted
    assert farpool.get(keeper.read.remote(), timeout=60) == 2.0 * (MB // 8)
    assert farpool.get(keeper.drop.remote(), timeout=60)
    wait_until_freed(base, "an object borrowed through a task")


def test_a_ref_found_inside_a_borrowed_value_is_counted_too(small_store):
    base = used_bytes()
    inner = farpool.put(np.full(MB // 8, 3.0))
    outer = farpool.put([inner])
    keeper = Keeper.remote()
    assert farpool.get(keeper.keep_inner.remote([outer]), timeout=60)
    del inner, outer
    settle()
    assert used_bytes() >= base + MB  # the container is gone; the actor's ref to the inside is not
    assert farpool.get(keeper.read.remote(), timeout=60) == 3.0 * (MB // 8)
    assert farpool.get(keeper.drop.remote(), timeout=60)
    wait_until_freed(base, "an object found inside a borrowed value")


@farpool.remote(max_retries=0)
def hand_to_and_die(keeper, box):
    farpool.get(keeper.keep.remote([box[0]]), timeout=60)
    os._exit(1)  # before our reply tells the owner that the keeper borrows box[0] from it


def counted_borrowers(ref):
    settle()
    return farpool.api._client().objects[ref.binary()].borrowers


def test_a_borrow_passed_on_by_a_task_whose_worker_died_is_still_counted(small_store):
    base = used_bytes()
    ref = farpool.put(np.full(MB // 8, 6.0))
    keeper = Keeper.remote()
    keeper_id = farpool.get(keeper.identity.remote(), timeout=60)
    with pytest.raises(farpool.WorkerCrashedError):
        farpool.get(hand_to_and_die.remote(keeper, [ref]), timeout=60)
    wait_until(lambda: keeper_id in counted_borrowers(ref), "the owner counting the keeper")
    del ref
    assert farpool.get(keeper.read.remote(), timeout=60) == 6.0 * (MB // 8)
    assert farpool.get(keeper.drop.remote(), timeout=60)
    wait_until_freed(base, "an object borrowed through a dead task")


def test_a_borrow_passed_on_by_a_borrower_that_died_is_still_counted(small_store, tmp_path):
    base = used_bytes()
    ref = farpool.put(np.full(MB // 8, 8.0))
    first, second = Keeper.remote(), Keeper.remote()
    assert farpool.get(first.keep.remote([ref]), timeout=60)
    first_id, second_id = farpool.get([first.identity.remote(), second.identity.remote()], timeout=60)
    first_pid = farpool.get(first.pid.remote(), timeout=60)
    gate = Gate(str(tmp_path / "gate.sock"))
    try:
        assert farpool.get(first.pass_on.remote(second, gate.path), timeout=60)
        gate.wait_arrivals(1)  # the second keeper holds it, and has told no one yet
        os.kill(first_pid, signal.SIGKILL)
        wait_until(lambda: first_id not in counted_borrowers(ref), "the owner seeing the first keeper die")
    finally:
        gate.close()
    wait_until(lambda: second_id in counted_borrowers(ref), "the owner counting the second keeper")
    del ref
    assert farpool.get(second.read.remote(), timeout=60) == 8.0 * (MB // 8)
    assert farpool.get(second.drop.remote(), timeout=60)
    wait_until_freed(base, "an object borrowed from a borrower that died")


def test_a_lend_that_comes_after_its_borrower_released_does_not_count_it_again(small_store):
    # The caller already borrows the ref, gets it back inside a result, lets go of it, and
    # only then does the AddBorrower naming it, sent by the worker that returned it, arrive.
    base = used_bytes()
    ref = farpool.put(np.full(MB // 8, 9.0))
    lender, caller = Keeper.remote(), Keeper.remote()
    assert farpool.get([lender.keep.remote([ref]), caller.keep.remote([ref])], timeout=60) == [True, True]
    lender_id, caller_id = farpool.get([lender.identity.remote(), caller.identity.remote()], timeout=60)
    assert {lender_id, caller_id} <= counted_borrowers(ref)
    assert farpool.get(lender.hold_lends.remote(), timeout=60)
    assert farpool.get(caller.take_from.remote(lender), timeout=60)
    assert farpool.get(caller.drop.remote(), timeout=60)
    wait_until(lambda: caller_id not in counted_borrowers(ref), "the caller's release reaching the owner")
    assert farpool.get(lender.release_lends.remote(), timeout=60)
    assert farpool.get(lender.drop.remote(), timeout=60)  # its release follows its AddBorrower
    wait_until(lambda: lender_id not in counted_borrowers(ref), "the lender's release reaching the owner")
    assert caller_id not in counted_borrowers(ref)
    del ref
    wait_until_freed(base, "an object whose borrower released it before the lend naming it came")


def test_a_ref_returned_by_a_worker_that_died_before_its_lend_is_still_counted(small_store):
    base = used_bytes()
    ref = farpool.put(np.full(MB // 8, 10.0))
    lender, caller = Keeper.remote(), Keeper.remote()
    assert farpool.get(lender.keep.remote([ref]), timeout=60)
    lender_id, caller_id = farpool.get([lender.identity.remote(), caller.identity.remote()], timeout=60)
    lender_pid = farpool.get(lender.pid.remote(), timeout=60)
    assert farpool.get(lender.hold_lends.remote(), timeout=60)  # its AddBorrower never leaves
    assert farpool.get(caller.take_from.remote(lender), timeout=60)
    # A read asks the owner on the socket the caller's reports take: they arrive before it.
    assert farpool.get(caller.read.remote(), timeout=60) == 10.0 * (MB // 8)
    os.kill(lender_pid, signal.SIGKILL)
    wait_until(lambda: lender_id not in counted_borrowers(ref), "the owner seeing the lender die")
    assert caller_id in counted_borrowers(ref)
    del ref
    assert farpool.get(caller.read.remote(), timeout=60) == 10.0 * (MB // 8)
    assert farpool.get(caller.drop.remote(), timeout=60)
    wait_until_freed(base, "an object returned by a worker that died")


@farpool.remote
class Holder:
    def __init__(self, box):
        self.box = box  # refs in the constructor's arguments: the actor may keep them all its life

    def read(self):
        return float(farpool.get(self.box[0], timeout=60).sum())


def test_refs_in_actor_constructor_arguments_live_until_the_actor_dies(small_store):
    base = used_bytes()
    ref = farpool.put(np.full(MB // 8, 4.0))
    holder = Holder.remote([ref])
    del ref
    assert farpool.get(holder.read.remote(), timeout=60) == 4.0 * (MB // 8)
    assert used_bytes() >= base + MB
    farpool.kill(holder)
    wait_until_freed(base, "an object in the arguments of a dead actor")


def test_a_borrower_that_dies_releases_its_borrows(small_store):
    base = used_bytes()
    ref = farpool.put(np.ones(MB // 8))
    keeper = Keeper.remote()
    assert farpool.get(keeper.keep.remote([ref]), timeout=60)
    pid = farpool.get(keeper.pid.remote(), timeout=60)
    del ref
    assert used_bytes() >= base + MB
    os.kill(pid, signal.SIGKILL)
    wait_until_freed(base, "an object whose only borrower was killed")


def test_refs_inside_a_put_value_live_as_long_as_it(small_store):
    base = used_bytes()
    inner = farpool.put(np.ones(MB // 8))
    outer = farpool.put({"inner": inner})
    del inner
    assert used_bytes() >= base + MB
    got = farpool.get(farpool.get(outer)["inner"])
    assert got.sum() == MB // 8
    del got, outer
    assert used_bytes() == base


def test_a_ref_pickled_by_hand_is_pinned_with_a_warning(small_store):
    import pickle
    base = used_bytes()
    ref = farpool.put(np.ones(MB // 8))
    with pytest.warns(RuntimeWarning, match="pickled outside farpool"):
        blob = pickle.dumps(ref)
    del ref
    assert used_bytes() >= base + MB  # whoever unpickles blob later still finds it
    assert farpool.get(pickle.loads(blob)).sum() == MB // 8


@farpool.remote
class Maker:
    def make(self):
        self.mine = farpool.put(np.ones(MB // 8))  # owned by this actor
        return [self.mine], os.getpid()


def test_a_value_whose_owner_on_this_node_died_fails_clearly_instead_of_hanging(small_store):
    maker = Maker.remote()
    box, pid = farpool.get(maker.make.remote(), timeout=60)
    os.kill(pid, signal.SIGKILL)  # no goodbye: only its exit tells
    with pytest.raises(farpool.OwnerDiedError, match="its process has exited") as info:
        farpool.get(box[0], timeout=60)
    assert box[0].hex() in str(info.value)


@farpool.remote
class Lender:
    def make(self, n):
        self.mine = farpool.put(np.arange(n, dtype=np.float64))
        return [self.mine]  # the caller borrows it

    def summed(self, arr):
        return float(arr.sum())


@pytest.mark.parametrize("n", [10, 1 << 20])  # inline, and in the store
def test_a_ref_received_inside_a_value_can_be_passed_to_a_task_without_a_get_first(small_store, n):
    lender, other = Lender.remote(), Lender.remote()
    [ref] = farpool.get(lender.make.remote(n), timeout=60)  # an entry, not yet fetched from its owner
    assert farpool.get(total.remote(ref), timeout=60)[0] == float(np.arange(n).sum())
    [ref] = farpool.get(lender.make.remote(n), timeout=60)
    assert farpool.get(other.summed.remote(ref), timeout=60) == float(np.arange(n).sum())  # an actor call
