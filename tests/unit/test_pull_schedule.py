"""The chunk schedule of a copy between node stores (farpool._private.pull)."""

from farpool._private.pull import Pull


def test_chunks_go_to_the_least_loaded_source_up_to_the_window():
    job = Pull(1, b"s", size=10 * 100, sources=["a", "b"], chunk=100, window=2)
    asks = job.requests()
    assert [(s, o) for s, o, _ in asks] == [("a", 0), ("b", 100), ("a", 200), ("b", 300)]
    assert job.requests() == []  # both windows full until chunks arrive
    assert job.received_chunk("a", 0, 100)
    assert [(s, o) for s, o, _ in job.requests()] == [("a", 400)]


def test_the_last_chunk_is_short_and_the_pull_ends_when_all_arrived():
    job = Pull(1, b"s", size=250, sources=["a"], chunk=100, window=8)
    asks = job.requests()
    assert [length for _, _, length in asks] == [100, 100, 50]
    for source, offset, length in asks:
        assert not job.done
        assert job.received_chunk(source, offset, length)
    assert job.done and not job.failed


def test_a_chunk_not_asked_of_that_source_is_ignored():
    job = Pull(1, b"s", size=200, sources=["a", "b"], chunk=100, window=1)
    job.requests()  # 0 from a, 100 from b
    assert not job.received_chunk("b", 0, 100)
    assert job.received_chunk("a", 0, 100)
    assert not job.received_chunk("a", 0, 100)  # twice: counted once
    assert job.received == 100


def test_a_failed_source_gives_its_chunks_to_the_others():
    job = Pull(1, b"s", size=400, sources=["a", "b"], chunk=100, window=1)
    job.requests()  # 0 from a, 100 from b
    job.source_failed("a", "a: it is not in its store")
    asks = job.requests()
    assert asks == []  # b's window is full; 0 waits for it
    assert job.received_chunk("b", 100, 100)
    assert [(s, o) for s, o, _ in job.requests()] == [("b", 0)]
    assert not job.failed


def test_the_pull_fails_when_no_source_is_left_and_says_why():
    job = Pull(1, bytes(16), size=300, sources=["a", "b"], chunk=100)
    job.requests()
    job.source_failed("a", "node a: it is not in its store")
    job.source_failed("b", "node b died")
    assert job.failed and job.requests() == []
    assert "node a: it is not in its store" in job.error() and "node b died" in job.error()


def test_a_pull_with_no_sources_fails_at_once():
    job = Pull(1, b"s", size=300, sources=[])
    assert job.failed and "no node holds it" in job.error()


def test_silent_sources_are_those_that_owe_chunks_and_sent_none_for_a_while():
    job = Pull(1, b"s", size=400, sources=["a", "b"], chunk=100, window=1)
    job.requests()
    asked = job.heard["a"]
    assert job.silent_sources(asked + 1, silent_s=5) == []
    assert job.received_chunk("b", 100, 100)
    job.requests()
    job.heard["b"] = asked + 4  # b answered later than a was asked
    assert job.silent_sources(asked + 6, silent_s=5) == ["a"]
    assert sorted(job.silent_sources(asked + 10, silent_s=5)) == ["a", "b"]
