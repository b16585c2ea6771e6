"""What each module costs the process that imports it: Python heap allocated while
the module (and what it imports) loads, by tracemalloc, as ``-X importtime`` shows time.

    python benchmarks/import_memory.py farpool._private.worker [--top 25]
    python benchmarks/import_memory.py farpool._private.head farpool._private.node --top 40

Prints, per module, the memory its own loading kept (self) and with everything it
imported first (cumulative), largest first, then the process's RSS before and after.
tracemalloc counts Python allocations only: shared libraries (libzmq, numpy's
extension modules) appear in the RSS line, not in the table.  Run it for the roles
in turn (worker, head, node agent) to see where an idle process's memory goes.
"""

from __future__ import annotations

import argparse
import importlib.abc
import sys
import tracemalloc


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class _Measured(importlib.abc.Loader):
    """Wraps a module's loader: measures the heap kept while its body runs."""

    def __init__(self, loader, name, stack, table):
        self.loader, self.name, self.stack, self.table = loader, name, stack, table

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        before = tracemalloc.get_traced_memory()[0]
        self.stack.append(0)
        try:
            self.loader.exec_module(module)
        finally:
            children = self.stack.pop()
            total = tracemalloc.get_traced_memory()[0] - before
            self.table[self.name] = (total - children, total)
            if self.stack:
                self.stack[-1] += total


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self):
        self.stack: list[int] = []
        self.table: dict[str, tuple[int, int]] = {}

    def find_spec(self, name, path, target=None):
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Measured(spec.loader, name, self.stack, self.table)
                return spec
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="+")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    finder = _Finder()
    rss0 = rss_mb()
    tracemalloc.start()
    sys.meta_path.insert(0, finder)
    for name in args.modules:
        importlib.import_module(name)
    sys.meta_path.remove(finder)
    heap = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    rows = sorted(finder.table.items(), key=lambda kv: -kv[1][0])
    print(f"{'self KB':>8} {'cum KB':>8}  module")
    for name, (own, cum) in rows[:args.top]:
        print(f"{own / 1024:8.0f} {cum / 1024:8.0f}  {name}")
    ours = sum(own for name, (own, _) in finder.table.items() if name.split(".")[0] == "farpool")
    print(f"{len(finder.table)} modules, {heap / 2**20:.1f} MB of Python heap ({ours / 2**20:.1f} MB in "
          f"farpool's own); RSS {rss0:.1f} -> {rss_mb():.1f} MB (with tracemalloc's own overhead)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
