"""Identical worker lines forwarded to a driver print once, then a count."""

from farpool._private.log_repeats import RepeatFilter, text_of


def test_the_same_line_from_many_workers_prints_once_then_its_count():
    f = RepeatFilter(window_s=5.0)
    assert f.filter("(step pid=1, node=aa) loading data\n", 0.0) == "(step pid=1, node=aa) loading data\n"
    for pid in range(2, 10):
        assert f.filter(f"(step pid={pid}, node=bb) loading data\n", 1.0) == ""
    assert f.filter("(step pid=3, node=bb) other\n", 2.0) == "(step pid=3, node=bb) other\n"
    assert f.filter("(step pid=4, node=bb) done\n", 5.0) == (
        "loading data [repeated 8x across cluster]\n(step pid=4, node=bb) done\n")


def test_a_line_seen_once_closes_its_window_silently_and_prints_again_later():
    f = RepeatFilter(window_s=5.0)
    assert f.filter("(a pid=1, node=x) hi\n", 0.0) == "(a pid=1, node=x) hi\n"
    assert f.filter("(a pid=1, node=x) hi\n", 6.0) == "(a pid=1, node=x) hi\n"


def test_text_of_strips_only_the_worker_prefix():
    assert text_of("(f pid=12, node=ab) x (y) z\n") == "x (y) z\n"
    assert text_of("plain (line)\n") == "plain (line)\n"
