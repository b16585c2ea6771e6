"""The client's link to the head (head_link.LinkState): connected, away since t, given up;
fed times and events, no sockets."""

from farpool._private.head_link import AWAY, CONNECTED, GIVEN_UP, LinkState


def test_an_outage_starts_once_and_ends_when_the_head_welcomes_us():
    link = LinkState(timeout_s=15)
    assert link.lost(100.0) is True and link.state == AWAY
    assert link.lost(101.0) is False  # a second close during the same outage: still since 100
    assert link.wait_left(104.0) == 11.0
    assert link.expired(114.9) is False
    assert link.welcomed(101.5) == 1.5 and link.state == CONNECTED and link.outages == [1.5]
    assert link.welcomed(102.0) is None  # a Welcome with no outage (a second one) changes nothing
    assert link.wait_left(200.0) == 0.0


def test_a_head_away_for_the_timeout_is_given_up_once_and_for_good():
    link = LinkState(timeout_s=3)
    link.lost(10.0)
    assert link.expired(12.9) is False
    assert link.expired(13.0) is True and link.state == GIVEN_UP
    assert link.expired(20.0) is False      # given up once
    assert link.lost(21.0) is False and link.welcomed(21.0) is None and link.state == GIVEN_UP
