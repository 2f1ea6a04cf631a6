"""Engines a user would pick instead of tgserve, measured on the same checkpoint and workload.

Each peer is a small runner script (`*_runner.py`) run with that peer's own python (a venv made by
`tgserve benchmark peers setup`), printing one JSON result line (`peer_protocol.py`); `registry.py`
knows the peers and runs them, `venvs.py` installs them. Nothing here is run by the test suite or CI.
"""
