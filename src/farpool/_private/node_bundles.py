"""The node agent's placement group bundles: its side of the head's two phases.

Part of the node agent (node.py): ``BundlesPart`` is mixed into ``NodeAgent`` and runs
on the agent's one thread; nothing else may call it.  Only the head sends what it
handles (node.MAY_SEND, on our connection to it).  The decisions are in
placement_groups.py (the head's, pure) and leases.LeaseManager (the bundles' resources
here, pure); this is the I/O around them::

    head --PrepareBundles--> reserve the bundles' resources --BundlesPrepared(ok, why)--> head
    head --CommitBundles--> they become resources of their own --BundlesCommitted--> head
    head --ReleaseBundles--> given back; a removed group's leases ended --BundlesReleased--> head
        (each answer carries our totals and what is free now)

It uses the agent's state set in ``NodeAgent.__init__`` (``leases``, ``head``,
``node_id``, ``loop``) and the agent's ``_apply``.
"""

from __future__ import annotations

from farpool._private import transport
from farpool._private.protocol import encode

# A removed placement group's leases still held this long after the removal are ended (their
# workers killed).  Longer spares the idle leases clients keep for a moment (client.LEASE_LINGER_S:
# their workers need not be started again); shorter ends the group's running tasks sooner.
REMOVED_GROUP_GRACE_S = 0.25


class BundlesPart:
    """NodeAgent's handlers for the head's PrepareBundles, CommitBundles and ReleaseBundles."""

    # --- placement group bundles (two phases, driven by the head: placement_groups.py) ---
    def _bundles_changed(self, tag: str, *fields) -> None:
        """Answer the head with what we have now (bundles change our totals)."""
        resources = self.leases.resources
        transport.send(self.head, encode(tag, (*fields, self.node_id, dict(resources.total),
                                               dict(resources.available))))

    def _on_PrepareBundles(self, group: str, attempt: int, items: list) -> None:
        ok, why = self.leases.prepare_bundles(group, attempt, [(int(i), shape) for i, shape in items])
        self._bundles_changed("BundlesPrepared", group, attempt, ok, why)

    def _on_CommitBundles(self, group: str, attempt: int, indexes: list) -> None:
        self._apply(self.leases.commit_bundles(group, attempt, indexes))
        self._bundles_changed("BundlesCommitted", group, attempt)

    def _on_ReleaseBundles(self, group: str, attempt, why: str) -> None:
        self._apply(self.leases.release_bundles(group, attempt, why))
        self._bundles_changed("BundlesReleased", group)
        if attempt is None:  # removed: what its leases still run ends a moment later
            self.loop.call_later(REMOVED_GROUP_GRACE_S, lambda: self._apply(self.leases.end_group_leases(group)))
