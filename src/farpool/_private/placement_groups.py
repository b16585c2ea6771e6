"""Placement groups: the head's table of groups and how their bundles are reserved.  Pure.

Owns the group lifecycle and the choice of nodes; no sockets, threads or clocks.
The head's I/O shell (head.py) feeds it events and carries out the ``Actions``
it returns; the node agents hold the bundles (leases.LeaseManager).  Also owns
the internal names a bundle's resources take on its node (used by the agent,
the head and options.py), so that tasks and actors in a group use the normal
lease path::

    create --> PENDING --a placement fits--> PREPARING --every node prepared--> COMMITTING
                 ^   \\                          | a node refused: abort all        |
                 |    \\__________ <-----------+                 every node committed
                 |                                                                 v
                 +------------- a node holding bundles died <-------------------- CREATED
    remove (any state) --> REMOVED

Atomic across nodes in two phases: each chosen node first *prepares* its
bundles (takes their resources from what it has free), and only when every node
has prepared are they *committed* (the bundles become resources of their own on
their node); a refusal aborts the attempt and every node releases what it
prepared.  One group is in flight at a time, in creation order among those that
fit now: two groups never hold parts of each other's nodes, so neither waits for
the other (no deadlock); a group that does not fit now does not hold up the
ones behind it.

Resource names: bundle ``i`` of group ``g`` with ``{"CPU": 2}`` adds, on its
node, ``CPU_group_<g>_<i>`` (that bundle) and ``CPU_group_<g>`` (any bundle of
the group on the node), each 2, and the markers ``bundle_group_<g>_<i>`` and
``bundle_group_<g>`` (``MARKER`` units each), so that a task asking no
resources still lands in the group.  A task in bundle ``i`` asks for both names
of each resource (the group's total on the node stays right) and a little of the
marker.  Never shown to users as part of the API; ``farpool.nodes()`` lists
them, as Ray does.
"""

from __future__ import annotations

import re

from farpool._private import scheduling

PENDING, PREPARING, COMMITTING, CREATED, REMOVED = "PENDING", "PREPARING", "COMMITTING", "CREATED", "REMOVED"
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")

# Units of a bundle's marker resource, and what one task or actor in it takes of
# them: at most MARKER / MARKER_SHARE of them at once per bundle.
MARKER = 1000 * scheduling.UNIT
MARKER_SHARE = 10  # 0.001
# A zero amount of this name in a shape costs nothing and tells the worker that
# the task's children go to the same group (capture_child_tasks).
CAPTURE = "capture"
# Steps the search for a placement may take before it gives up (many bundles on
# many nodes with STRICT_SPREAD): bounds the head's time per attempt.
SEARCH_BUDGET = 5_000
# How many removed groups each agent remembers, to fail late lease requests
# for them at once (rather than let them wait for a group that never comes), and
# the head keeps in its table (placement_group_table shows them REMOVED).
REMEMBER_REMOVED = 10_000

_NAME = re.compile(r"^(.+)_group_([0-9a-f]{16})(?:_(\d+))?$")


def new_id(random_bytes: bytes) -> str:
    return random_bytes[:8].hex()


def bundle_resources(pg_id: str, index: int, shape: dict[str, int]) -> dict[str, int]:
    """What committing bundle ``index`` (``shape``, fixed point) adds to its node."""
    added = {f"bundle_group_{pg_id}_{index}": MARKER, f"bundle_group_{pg_id}": MARKER}
    for name, amount in shape.items():
        added[f"{name}_group_{pg_id}_{index}"] = amount
        added[f"{name}_group_{pg_id}"] = amount
    return added


def task_shape(pg_id: str, index: int, shape: dict[str, int], capture: bool = False) -> dict[str, int]:
    """A task's (or actor's) ``shape`` run in bundle ``index`` of the group (-1: any bundle)."""
    out = {}
    for name, amount in shape.items():
        out[f"{name}_group_{pg_id}"] = amount
        if index >= 0:
            out[f"{name}_group_{pg_id}_{index}"] = amount
    out[f"bundle_group_{pg_id}" if index < 0 else f"bundle_group_{pg_id}_{index}"] = MARKER_SHARE
    if capture:
        out[f"{CAPTURE}_group_{pg_id}"] = 0
    return out


def group_of(shape: dict) -> str | None:
    """The group a shape's resources belong to, or None (a shape of the normal kind)."""
    for name in shape:
        if "_group_" in name:
            match = _NAME.match(name)
            if match:
                return match.group(2)
    return None


def captured_group(resources: dict) -> str | None:
    """The group whose tasks' children go to it too (the capture tag), from a task's shape."""
    for name in resources:
        if name.startswith(CAPTURE + "_group_"):
            return name[len(CAPTURE) + 7:]
    return None


def plain_resources(resources: dict) -> dict:
    """A shape in a group as the user gave it: ``CPU_group_<g>`` back to ``CPU`` (no markers)."""
    out = {}
    for name, amount in resources.items():
        match = _NAME.match(name)
        if match is None:
            out[name] = amount
        elif match.group(3) is None and match.group(1) not in ("bundle", CAPTURE):
            out[match.group(1)] = amount
    return out


def check_bundles(bundles) -> list[dict[str, int]]:
    """The bundles as shapes in fixed point; ValueError/TypeError naming the bad one."""
    if not isinstance(bundles, (list, tuple)) or not bundles:
        raise ValueError(f"`bundles` must be a non-empty list of dicts such as [{{'CPU': 1}}], got {bundles!r}")
    shapes = []
    for i, bundle in enumerate(bundles):
        if not isinstance(bundle, dict):
            raise TypeError(f"bundle {i} must be a dict of resource name -> amount, got {type(bundle).__name__}")
        shape = {}
        for name, value in bundle.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"bundle {i}: resource names must be non-empty strings, got {name!r}")
            if "_group_" in name:
                raise ValueError(f"bundle {i}: resource name {name!r} is reserved for placement groups")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
                raise ValueError(f"bundle {i}: `{name}` must be a number >= 0, got {value!r}")
            if name == "GPU" and value > 1 and value != int(value):
                raise ValueError(f"bundle {i}: `GPU` above 1 must be a whole number, got {value}")
            if value:
                shape[name] = scheduling.to_fixed(value)
        if not shape:
            raise ValueError(f"bundle {i} reserves nothing ({bundle!r}): every bundle needs some resource > 0")
        shapes.append(shape)
    return shapes


# ---------------------------------------------------------------------- choosing nodes
def _add(a: dict, b: dict) -> dict:
    out = dict(a)
    for name, amount in b.items():
        out[name] = out.get(name, 0) + amount
    return out


def _minus(a: dict, b: dict) -> dict:
    return {name: amount - b.get(name, 0) for name, amount in a.items()}


def place(strategy: str, bundles: list[dict], capacity: dict[str, dict], fixed: dict[int, str] | None = None
          ) -> dict[int, str] | None:
    """Nodes for the bundles not in ``fixed`` (index -> node id, already placed): index -> node id,
    or None when ``capacity`` (node id -> resources, fixed point) cannot hold them.

    PACK: as few nodes as possible (one if it fits); SPREAD: as many as possible;
    STRICT_PACK: all on one node; STRICT_SPREAD: each on a node of its own.  Among
    equals the node with the most CPU free comes first, then the node id.
    """
    fixed = dict(fixed or {})
    todo = sorted((i for i in range(len(bundles)) if i not in fixed),
                  key=lambda i: (-sum(bundles[i].values()), i))  # the largest first: fewer dead ends
    if not todo:
        return {}
    free = {node: dict(resources) for node, resources in capacity.items()}

    def roomiest(nodes):
        return sorted(nodes, key=lambda n: (-free[n].get("CPU", 0), n))

    if strategy == "STRICT_PACK":
        total: dict = {}
        for i in todo:
            total = _add(total, bundles[i])
        targets = [next(iter(fixed.values()))] if fixed else roomiest(free)
        for node in targets:
            if node in free and scheduling.fits(free[node], total):
                return {i: node for i in todo}
        return None
    if strategy == "PACK" and not fixed:
        whole = place("STRICT_PACK", bundles, capacity)
        if whole is not None:
            return whole
    used: dict[str, int] = {}
    for node in fixed.values():
        used[node] = used.get(node, 0) + 1
    if strategy == "STRICT_SPREAD" and len(todo) > len(set(free) - set(used)):
        return None  # (not enough nodes: no search)
    chosen: dict[int, str] = {}
    budget = [SEARCH_BUDGET]

    def candidates(i):
        fitting = [n for n in free if scheduling.fits(free[n], bundles[i])]
        if strategy == "STRICT_SPREAD":
            return roomiest([n for n in fitting if not used.get(n)])
        ranked = roomiest(fitting)
        if strategy == "PACK":
            return sorted(ranked, key=lambda n: -used.get(n, 0))  # stable: roomiest among equals
        return sorted(ranked, key=lambda n: used.get(n, 0))       # SPREAD

    def search(k: int) -> bool:
        if k == len(todo):
            return True
        i = todo[k]
        for node in candidates(i):
            budget[0] -= 1
            if budget[0] < 0:
                return False
            free[node] = _minus(free[node], bundles[i])
            used[node] = used.get(node, 0) + 1
            chosen[i] = node
            if search(k + 1):
                return True
            free[node] = _add(free[node], bundles[i])
            used[node] -= 1
            del chosen[i]
        return False

    return dict(chosen) if search(0) else None


# ---------------------------------------------------------------------- the table
class Group:
    """A placement group (a plain class, not a dataclass: see scheduling.Allocation)."""

    def __init__(self, pg_id: str, bundles: list, strategy: str, name: str = "", job_id=None,
                 detached: bool = False, state: str = PENDING, nodes: list | None = None, attempt: int = 0,
                 cause: str = ""):
        self.pg_id = pg_id
        self.bundles = bundles            # fixed-point shapes
        self.strategy = strategy
        self.name = name
        self.job_id = job_id
        self.detached = detached
        self.state = state
        self.nodes: list = [] if nodes is None else nodes  # per bundle: its node id (prepared or committed), or None
        self.attempt = attempt
        self.waiting: dict = {}           # node id -> indexes of this attempt not yet answered
        self.attempt_nodes: set = set()   # nodes asked to prepare in this attempt
        self.attempt_indexes: set = set()  # the bundles this attempt places
        self.failed_view = None           # the view in which the last attempt failed (not tried again in it)
        self.warned = False
        self.cause = cause                # why it was removed

    def __repr__(self) -> str:
        return f"Group({self.pg_id}, {self.strategy}, {self.state}, attempt {self.attempt})"

    def row(self) -> dict:
        """What the head's database keeps of it (head_store "placement_groups"; see restore)."""
        return {"pg_id": self.pg_id, "bundles": self.bundles, "strategy": self.strategy, "name": self.name,
                "job_id": self.job_id, "detached": self.detached, "state": self.state, "nodes": list(self.nodes),
                "attempt": self.attempt, "attempt_indexes": sorted(self.attempt_indexes), "cause": self.cause}

    def info(self) -> dict:
        """What placement_group_table() shows of it (resources as floats)."""
        return {"placement_group_id": self.pg_id, "name": self.name, "strategy": self.strategy,
                "state": self.state, "bundles": {i: scheduling.as_floats(b) for i, b in enumerate(self.bundles)},
                "bundles_to_node_id": {i: n for i, n in enumerate(self.nodes) if n is not None and
                                       self.state == CREATED},
                "job_id": self.job_id, "lifetime": "detached" if self.detached else None,
                "removal_cause": self.cause or None}


class Actions:
    def __init__(self, prepare=None, commit=None, abort=None, removed=None, created=None, warnings=None,
                 forgotten=None):
        self.prepare: list = prepare or []      # (node id, pg id, attempt, [(index, shape)])
        self.commit: list = commit or []        # (node id, pg id, attempt, [index])
        self.abort: list = abort or []          # (node id, pg id, attempt): release what that attempt prepared
        self.removed: list = removed or []      # Group: every node releases it, its actors end, waiters told
        self.created: list = created or []      # Group: waiters told, its pending actors placed
        self.warnings: list = warnings or []    # messages, logged once per group
        self.forgotten: list = forgotten or []  # pg ids of removed groups the table let go: their rows too

    def extend(self, other: "Actions") -> "Actions":
        for name in ("prepare", "commit", "abort", "removed", "created", "warnings", "forgotten"):
            getattr(self, name).extend(getattr(other, name))
        return self


class PlacementGroups:
    """Every placement group of the cluster, and the one being reserved now (if any)."""

    def __init__(self, embedded: bool):
        self.embedded = embedded
        self.groups: dict[str, Group] = {}    # in creation order
        self.names: dict[str, str] = {}       # name -> pg id (live groups)
        self.nodes: dict[str, dict] = {}      # node id -> {"alive", "total", "available"} (the head's view)
        self.in_flight: str | None = None
        self.removed_order: list[str] = []    # removed groups still in the table, oldest first

    # --- events ---
    def create(self, pg_id: str, bundles: list, strategy: str, name: str = "", job_id=None,
               detached: bool = False) -> tuple[Actions, str | None]:
        """(actions, error): an error (and no group) when the group can never fit an embedded cluster,
        or its name is taken."""
        if strategy not in STRATEGIES:
            return Actions(), f"`strategy` must be one of {', '.join(STRATEGIES)}, got {strategy!r}"
        if name and name in self.names:
            return Actions(), (f"a placement group named {name!r} already exists; remove it first "
                               "(farpool.util.remove_placement_group) or choose another name")
        group = Group(pg_id, [dict(b) for b in bundles], strategy, name or "", job_id, detached,
                      nodes=[None] * len(bundles))
        totals = self._capacity("total")
        if place(strategy, group.bundles, totals) is None:
            message = self.infeasible_message(group)
            if self.embedded:
                return Actions(), message
            group.warned = True
            self._register(group)
            return Actions(warnings=[message]), None
        self._register(group)
        return self._next(), None

    def nodes_changed(self, nodes: list[dict]) -> Actions:
        """The head's node table changed (a node joined, died, or reported what it has free)."""
        acts = Actions()
        alive_before = {n for n, rec in self.nodes.items() if rec["alive"]}
        self.nodes = {n["node_id"]: {"alive": n["alive"], "total": dict(n["total"]),
                                     "available": dict(n["available"])} for n in nodes}
        for node_id in alive_before - {n for n, rec in self.nodes.items() if rec["alive"]}:
            acts.extend(self._node_died(node_id))
        return acts.extend(self._next())

    def prepared(self, pg_id: str, attempt: int, node_id: str, ok: bool, why: str = "") -> Actions:
        group = self.groups.get(pg_id)
        if group is None or group.state != PREPARING or group.attempt != attempt or node_id not in group.waiting:
            return Actions()  # an answer to an attempt given up on (aborted there already)
        indexes = group.waiting.pop(node_id)
        if not ok:
            return self._abort(group, f"node {node_id[:8]} could not prepare bundles {indexes}: {why}")
        if group.waiting:
            return Actions()
        group.state = COMMITTING
        acts = Actions()
        for node in sorted(group.attempt_nodes):
            indexes = [i for i, n in enumerate(group.nodes) if n == node and i in group.attempt_indexes]
            group.waiting[node] = indexes
            acts.commit.append((node, pg_id, attempt, indexes))
        return acts

    def committed(self, pg_id: str, attempt: int, node_id: str) -> Actions:
        group = self.groups.get(pg_id)
        if group is None or group.state != COMMITTING or group.attempt != attempt or node_id not in group.waiting:
            return Actions()
        del group.waiting[node_id]
        if group.waiting:
            return Actions()
        return self._settled(group)

    def _settled(self, group: Group) -> Actions:
        """Every node of the attempt answered its commit: CREATED, or PENDING again when a node
        of it died meanwhile (the bundles committed elsewhere stay where they are)."""
        group.attempt_nodes = set()
        group.attempt_indexes = set()
        self.in_flight = None
        acts = Actions()
        if all(n is not None for n in group.nodes):
            group.state = CREATED
            group.warned = False
            group.cause = ""
            acts.created.append(group)
        else:
            group.state = PENDING
        return acts.extend(self._next())

    def remove(self, pg_id: str, why: str) -> Actions:
        group = self.groups.get(pg_id)
        if group is None or group.state == REMOVED:
            return Actions()
        group.state = REMOVED
        group.cause = why
        group.waiting = {}
        if self.names.get(group.name) == pg_id:
            del self.names[group.name]
        if self.in_flight == pg_id:
            self.in_flight = None
        self.removed_order.append(pg_id)
        acts = Actions(removed=[group], forgotten=self._forget_oldest_removed())
        return acts.extend(self._next())

    def _forget_oldest_removed(self) -> list:
        """The oldest removed groups beyond REMEMBER_REMOVED leave the table; their ids."""
        gone = []
        while len(self.removed_order) > REMEMBER_REMOVED:
            gone.append(self.removed_order.pop(0))
            self.groups.pop(gone[-1], None)
        return gone

    def job_ended(self, job_id) -> Actions:
        """A job's groups end with it, except detached ones."""
        acts = Actions()
        for group in list(self.groups.values()):
            if group.job_id == job_id and not group.detached and group.state != REMOVED:
                acts.extend(self.remove(group.pg_id, f"the job that created it (job {job_id}) ended"))
        return acts

    # --- a restarted head (head.py: its database, then each node registering again) ---
    def restore(self, rows: list[dict], nodes: list[dict]) -> list:
        """Take back the groups a previous head wrote (``rows`` in creation order) and its node
        table.  A reservation it had in flight is given up: those bundles go back to waiting
        (what the nodes prepared of it they release when they register again: ``node_back``);
        the next attempt has a new number, so late answers to that one match nothing.
        Returns the ids of removed groups beyond REMEMBER_REMOVED, not taken back (their rows
        go: a head before this one kept them all)."""
        self.nodes = {n["node_id"]: {"alive": n["alive"], "total": dict(n["total"]),
                                     "available": dict(n.get("available", n["total"]))} for n in nodes}
        for row in rows:
            group = Group(row["pg_id"], [dict(b) for b in row["bundles"]], row["strategy"], row["name"],
                          row["job_id"], row["detached"], row["state"], list(row["nodes"]), row["attempt"],
                          cause=row.get("cause", ""))
            if group.state in (PREPARING, COMMITTING):
                for i in row.get("attempt_indexes", ()):
                    group.nodes[i] = None
                group.state = PENDING
            self.groups[group.pg_id] = group
            if group.state == REMOVED:
                self.removed_order.append(group.pg_id)
            elif group.name:
                self.names[group.name] = group.pg_id
        return self._forget_oldest_removed()

    def node_back(self, node_id: str, held: list) -> Actions:
        """A node registered again with a restarted head, holding ``held`` bundles ((group,
        index, attempt, committed) each): those the table places there stay; the others it
        releases (a removed group, an attempt given up on); a bundle the table places there
        that the node no longer holds is placed again."""
        acts = Actions()
        holds = set()
        release = set()
        for group_id, index, attempt, committed in held:
            group = self.groups.get(group_id)
            if (group is not None and group.state in (PENDING, CREATED) and committed
                    and 0 <= index < len(group.nodes) and group.nodes[index] == node_id):
                holds.add((group_id, index))
            else:
                release.add((node_id, group_id, attempt))
        acts.abort.extend(sorted(release))
        for group in self.groups.values():
            if group.state in (PENDING, CREATED):
                lost = [i for i, n in enumerate(group.nodes) if n == node_id and (group.pg_id, i) not in holds]
                for i in lost:
                    group.nodes[i] = None
                if lost and group.state == CREATED:
                    group.state = PENDING
                    group.failed_view = None
        return acts.extend(self._next())

    # --- reading ---
    def get(self, pg_id: str) -> Group | None:
        return self.groups.get(pg_id)

    def table(self) -> dict:
        return {pg_id: g.info() for pg_id, g in self.groups.items()}

    def infeasible_message(self, group: Group) -> str:
        live = [n for n in self.nodes.values() if n["alive"]]
        described = ", ".join(scheduling.describe({k: v for k, v in n["total"].items() if "_group_" not in k})
                              for n in live) or "no node"
        bundles = ", ".join(scheduling.describe(b) for b in group.bundles)
        what = {"STRICT_PACK": "all on one node", "STRICT_SPREAD": "each on a node of its own"}.get(
            group.strategy, "on the nodes")
        where = ("this embedded cluster cannot grow: declare more at init(num_cpus=..., resources=...)"
                 if self.embedded else "it waits until nodes that fit join (farpool start --address ...)")
        return (f"placement group {group.name or group.pg_id} ({group.strategy}) cannot be placed: its "
                f"bundles [{bundles}] do not fit {what}: the cluster's nodes have {described}; {where}. "
                "Ask for smaller bundles, or another strategy.")

    def validate_state(self) -> None:
        """Invariants, for tests: one group in flight at most, and only that one waits for answers."""
        flying = [g for g in self.groups.values() if g.state in (PREPARING, COMMITTING)]
        assert len(flying) <= 1, flying
        assert (flying[0].pg_id if flying else None) == self.in_flight, (flying, self.in_flight)
        for g in self.groups.values():
            assert len(g.nodes) == len(g.bundles)
            if g.state in (PENDING, REMOVED, CREATED):
                assert not g.waiting, g
            if g.state == CREATED:
                assert all(n is not None for n in g.nodes), g
            if g.state == REMOVED:
                assert self.names.get(g.name) != g.pg_id
        for name, pg_id in self.names.items():
            assert self.groups[pg_id].name == name and self.groups[pg_id].state != REMOVED

    # --- internals ---
    def _register(self, group: Group) -> None:
        self.groups[group.pg_id] = group
        if group.name:
            self.names[group.name] = group.pg_id

    def _capacity(self, which: str) -> dict[str, dict]:
        return {node_id: rec[which] for node_id, rec in self.nodes.items() if rec["alive"]}

    def _view(self) -> tuple:
        return tuple(sorted((n, rec["alive"], tuple(sorted(rec["available"].items())))
                            for n, rec in self.nodes.items()))

    def _next(self) -> Actions:
        """Start reserving the first pending group (in creation order) that fits now, unless one is
        in flight."""
        acts = Actions()
        if self.in_flight is not None:
            return acts
        view = None
        available = self._capacity("available")
        for group in self.groups.values():
            if group.state != PENDING:
                continue
            view = view or self._view()
            if group.failed_view == view:
                continue  # refused in this very view: wait for a change
            fixed = {i: n for i, n in enumerate(group.nodes) if n is not None}
            chosen = place(group.strategy, group.bundles, available, fixed)
            if chosen is None:
                if not group.warned and place(group.strategy, group.bundles, self._capacity("total"),
                                              fixed) is None:
                    group.warned = True
                    acts.warnings.append(self.infeasible_message(group))
                continue
            group.attempt += 1
            group.state = PREPARING
            group.attempt_indexes = set(chosen)
            group.attempt_nodes = set(chosen.values())
            group.waiting = {}
            for i, node in chosen.items():
                group.nodes[i] = node
            for node in sorted(group.attempt_nodes):
                items = [(i, group.bundles[i]) for i in sorted(chosen) if chosen[i] == node]
                group.waiting[node] = [i for i, _ in items]
                acts.prepare.append((node, group.pg_id, group.attempt, items))
            self.in_flight = group.pg_id
            return acts
        return acts

    def _abort(self, group: Group, why: str) -> Actions:
        acts = Actions()
        for node in sorted(group.attempt_nodes):
            acts.abort.append((node, group.pg_id, group.attempt))
        for i in group.attempt_indexes:
            group.nodes[i] = None
        group.state = PENDING
        group.waiting = {}
        group.attempt_nodes = set()
        group.attempt_indexes = set()
        group.failed_view = self._view()
        group.cause = why
        self.in_flight = None
        return acts.extend(self._next())

    def _node_died(self, node_id: str) -> Actions:
        """Bundles on a dead node are lost: their group goes back to PENDING to place just those
        (the others keep their nodes); an attempt that counted on the node is aborted."""
        acts = Actions()
        for group in self.groups.values():
            if group.state == REMOVED or node_id not in group.nodes:
                continue
            for i, n in enumerate(group.nodes):
                if n == node_id:
                    group.nodes[i] = None
            if group.state == PREPARING and node_id in group.attempt_nodes:
                group.attempt_nodes.discard(node_id)
                acts.extend(self._abort(group, f"node {node_id[:8]} died while preparing"))
            elif group.state == COMMITTING and node_id in group.attempt_nodes:
                # Others may have committed already: keep theirs, place the dead node's again.
                group.attempt_nodes.discard(node_id)
                group.waiting.pop(node_id, None)
                if not group.waiting:
                    acts.extend(self._settled(group))
            elif group.state == CREATED:
                group.state = PENDING
                group.failed_view = None
        return acts.extend(self._next())
