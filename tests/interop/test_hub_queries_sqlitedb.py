"""The whole hub query suite (test_hub_queries.py) against the SQLite task
database: db_query, get_result, result_status, resubmit, purge and
hub_history must behave as with the in-memory one."""

from .test_hub_queries import *  # noqa: F401,F403  (tests and fixtures)

HUB_ARGS = ["--sqlitedb"]
