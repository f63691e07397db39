"""`python tests/recipes/fault_driver.py ARGS...` = `moepost ARGS...` with the test fault hooks
of `fault_hooks.py` installed from the environment (a subprocess the tests signal and kill)."""

from __future__ import annotations

import sys

import fault_hooks

if __name__ == "__main__":
    fault_hooks.install_from_env()
    from moepost.cli import main

    raise SystemExit(main(sys.argv[1:]))
