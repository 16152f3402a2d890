# --8<-- [start:failures]
import logging

from repeat_every import repeat_every

log = logging.getLogger("myapp.jobs")
alerts: list[str] = []


def send_alert(exc: BaseException) -> None:
    """Stands for a message to your chat or pager (a def: it runs in a worker thread)."""
    alerts.append(f"sync_orders failed: {exc!r}")


def pull_orders() -> None:
    """Stands for a call to a partner's API that is sometimes down."""
    raise ConnectionError("partner API unreachable")


@repeat_every(seconds=5 * 60, logger=log, on_exception=send_alert)
def sync_orders() -> None:
    pull_orders()


@repeat_every(seconds=60, raise_exceptions=True)
async def check_config() -> None:
    raise RuntimeError("config file is corrupt")


# --8<-- [end:failures]
# --8<-- [start:complete]
warm: list[str] = []


def cache_is_warm() -> None:
    warm.append("done")


@repeat_every(seconds=10, max_repetitions=3, on_complete=cache_is_warm)
async def warm_cache() -> None:
    warm.append("batch")


# --8<-- [end:complete]
