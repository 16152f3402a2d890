"""Claim stores: run each tick of a task once across worker processes and hosts.

Give one to ``@repeat_every(seconds=..., store=...)`` (or ``repeat_at``): before each run the
task claims ``(its name, the tick)`` in the store, and only the process that wins runs it.

- [`SQLiteClaimStore`][]: one file, no server; every process of one host.
- [`RedisClaimStore`][]: a Redis (or Valkey) server; many hosts. Extra ``[redis]``.
- [`PostgresClaimStore`][]: a PostgreSQL database; many hosts. Extra ``[postgres]``.

Every store also keeps run records, per task (`TaskStatus`: the last claimed tick, the
last success, the last failure), written by ``claim`` and ``record_run`` and read by
``status``/``statuses``; and every store accepts the task names `check_task_name`
accepts.

Importing this module imports none of their drivers (not even ``sqlite3``): each store imports
its own on its first claim. See docs/many-workers.md for the guarantee and how to choose.
"""

from ._common import MAX_TASK_NAME_BYTES as MAX_TASK_NAME_BYTES
from ._common import LastClaim as LastClaim
from ._common import LastRun as LastRun
from ._common import TaskStatus as TaskStatus
from ._common import check_task_name as check_task_name
from ._postgres import PostgresClaimStore as PostgresClaimStore
from ._redis import RedisClaimStore as RedisClaimStore
from ._sqlite import SQLiteClaimStore as SQLiteClaimStore

__all__ = [
    "MAX_TASK_NAME_BYTES",
    "LastClaim",
    "LastRun",
    "PostgresClaimStore",
    "RedisClaimStore",
    "SQLiteClaimStore",
    "TaskStatus",
    "check_task_name",
]
