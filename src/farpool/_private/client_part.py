"""The base of the client's parts (see client.py): what every part reaches of the shell.

A part keeps its own state and gets the shared tables from the shell ``c`` it is made
by: the reference table and its lock and objects, the task queues, the connections and
the event loop.  It reaches a sibling part through the shell (``self.c.submitter``), never
by importing it, so the parts import nothing of each other and the shell composes them.
"""

from __future__ import annotations


class ClientPart:
    """See the module docstring."""

    def __init__(self, c):
        self.c = c
        self.conns = c.conns
        self.refs = c.refs
        self.lock = c.lock
        self.objects = c.objects
        self.queues = c.queues
        self.loop = c.loop
