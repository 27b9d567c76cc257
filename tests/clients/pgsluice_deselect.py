"""pytest plugin for the driver-suite scripts in this folder: deselects the tests listed in
PGSLUICE_DESELECT, one per line: a test file, or `file::test` (every parametrisation of exactly
that test, and no other test whose name merely starts the same). Lines starting with # are
comments."""

import os


def _listed():
    lines = os.environ.get("PGSLUICE_DESELECT", "").splitlines()
    return {line.strip() for line in lines if line.strip() and not line.strip().startswith("#")}


def pytest_collection_modifyitems(config, items):
    names = _listed()
    keep, drop = [], []
    for item in items:
        base = item.nodeid.split("[", 1)[0]
        path = base.split("::", 1)[0]
        (drop if base in names or path in names else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
