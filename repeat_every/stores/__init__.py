"""Claim stores: run each tick of a task once across worker processes and hosts.

Give one to ``@repeat_every(seconds=..., store=...)`` (or ``repeat_at``): before each run the
task claims ``(its name, the tick)`` in the store, and only the process that wins runs it.

- [`SQLiteClaimStore`][]: one file, no server; every process of one host.
- [`RedisClaimStore`][]: a Redis (or Valkey) server; many hosts. Extra ``[redis]``.
- [`PostgresClaimStore`][]: a PostgreSQL database; many hosts. Extra ``[postgres]``.

Importing this module imports none of their drivers (not even ``sqlite3``): each store imports
its own on its first claim. See docs/many-workers.md for the guarantee and how to choose.
"""

from ._postgres import PostgresClaimStore as PostgresClaimStore
from ._redis import RedisClaimStore as RedisClaimStore
from ._sqlite import SQLiteClaimStore as SQLiteClaimStore

__all__ = ["PostgresClaimStore", "RedisClaimStore", "SQLiteClaimStore"]
