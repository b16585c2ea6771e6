"""pytest plugin: joblib's own installed ``joblib/test/test_parallel.py`` against the backend "farpool".

Loaded by ``compat/run.py`` as ``-p joblib_plugin`` (compat/ on ``PYTHONPATH``)
with the installed test file as the target.  Before pytest collects it, the
plugin registers the backend (so joblib's lists built from its registry,
``BACKENDS``, ``ALL_VALID_BACKENDS`` and ``RETURN_GENERATOR_BACKENDS``,
include "farpool") and adds "farpool" to the module's ``PROCESS_BACKENDS``,
``PARALLEL_BACKENDS`` and ``all_backends_for_context_manager`` lists, which its
``@parametrize`` marks read at collection.  Then only the tests parametrized
with farpool are kept; the others test joblib's own backends.

Every test that is not run, or expected to fail, is listed in ``EXCLUDED``
with its reason; ``QUICK`` is the bounded selection ``run.py --quick`` uses.
"""

from __future__ import annotations

import os

import pytest

# test name (without parameters) -> reason; applied to its farpool variants.
_UNREGISTERED = (
    "the outer loop runs in loky's worker processes and names the backend 'farpool' by its string there; it "
    "cannot apply to a third-party backend: joblib looks names up in a registry of each process, and loky "
    "runs the caller's functions without importing its modules, so nothing registered 'farpool' in those "
    "workers (farpool patches nothing of joblib). Named by its object, a farpool Parallel runs inside loky's "
    "workers: tests/integration/test_joblib.py::test_a_farpool_parallel_inside_lokys_workers_named_by_its_object")
_MEMMAP = ("cannot apply to backend 'farpool', which does not use joblib's memmapping: big arrays are put in the "
           "cluster once per call and arrive as read-only ndarrays, not np.memmap files")
# test name (without parameters) -> reason; applied to its farpool variants.
EXCLUDED: dict[str, str] = {
    "test_parallel_with_interactively_defined_functions":
        "its `python -c` script names backend 'farpool' without importing farpool.joblib, which cannot work "
        "for a third-party backend: it exists only in processes that registered it; with the import the same "
        "script passes: tests/integration/test_joblib.py::test_functions_defined_in_python_c_run_with_the_backend",
    "test_auto_memmap_on_arrays_from_generator":
        "it checks that arguments arrive as np.memmap: " + _MEMMAP + "; what it guards (arrays made by the "
        "input generator arrive intact) is tests/integration/test_joblib.py::"
        "test_arrays_made_by_a_generator_arrive_intact",
    "test_memmapping_leaks":
        "it checks the np.memmap files in joblib's temp folder: " + _MEMMAP + ", freed when the call ends "
        "(FarpoolBackend.stop_call drops them)",
    "test_nested_loop[loky-farpool]": _UNREGISTERED,
    "test_nested_loop[back_compat_backend-farpool]": _UNREGISTERED + " (back_compat_backend is loky's)",
    "test_backend_nesting_level[parallel_config-farpool-loky]": _UNREGISTERED,
    "test_backend_nesting_level[parallel_backend-farpool-loky]": _UNREGISTERED,
}
# Tests run by `run.py --quick` (a bounded subset, a few seconds each on 2 cores).
QUICK = {
    "test_simple_parallel", "test_parallel_pretty_print", "test_parallel_kwargs", "test_error_capture",
    "test_error_in_task_iterator", "test_dispatch_one_job", "test_dispatch_multiprocessing",
    "test_nested_exception_dispatch", "test_invalid_njobs", "test_parallel_timeout_success",
    "test_parallel_timeout_fail", "test_abort_backend", "test_deadlock_with_generator",
    "test_multiple_generator_call", "test_lambda_expression", "test_backend_context_manager",
    "test_nested_loop", "test_parallel_as_context_manager", "test_batching_auto_subprocesses",
    "test_return_order_with_return_as_generator_parameter", "test_njobs_converted_to_int",
}


def _is_farpool(value) -> bool:
    from farpool.joblib import FarpoolBackend
    return value == "farpool" or isinstance(value, FarpoolBackend)


def pytest_configure(config):
    import farpool.joblib
    farpool.joblib.register()
    import joblib.test.test_parallel as tp  # imported now: its parametrize lists are extended below
    for name in ("PROCESS_BACKENDS", "PARALLEL_BACKENDS", "all_backends_for_context_manager"):
        values = getattr(tp, name, None)
        if isinstance(values, list) and "farpool" not in values:
            values.append("farpool")
    config.addinivalue_line("markers", "thread_unsafe: joblib's marker")


def pytest_collection_modifyitems(session, config, items):
    quick = os.environ.get("FARPOOL_COMPAT_QUICK") == "1"
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if not any(_is_farpool(v) for v in params.values()):
            drop.append(item)
            continue
        name = item.originalname
        if quick and name not in QUICK:
            drop.append(item)
            continue
        reason = EXCLUDED.get(item.name) or EXCLUDED.get(name)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
        keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


def pytest_sessionfinish(session, exitstatus):
    import farpool
    farpool.shutdown()
