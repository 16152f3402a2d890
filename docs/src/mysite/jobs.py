import logging

from django.conf import settings
from django.core.cache import cache

from repeat_every import repeat_every

log = logging.getLogger(__name__)


def fetch_rates() -> dict[str, float]:
    return {"EUR": 1.0, "USD": 1.08}  # your HTTP call or database query


@repeat_every(seconds=settings.RATES_REFRESH_SECONDS)
def refresh_rates() -> None:  # a def: it runs in a worker thread, like a sync Django view
    cache.set("rates", fetch_rates(), timeout=None)
    log.info("rates refreshed")
