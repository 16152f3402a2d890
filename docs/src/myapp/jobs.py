import datetime as dt

from repeat_every import Retry, repeat_at, repeat_every

UTC = dt.timezone.utc
tokens: dict[str, dt.datetime] = {}  # stands for your database: token name -> expiry


@repeat_every(seconds=60 * 60)
async def remove_expired_tokens() -> None:
    now = dt.datetime.now(UTC)
    for name, expires_at in list(tokens.items()):
        if expires_at <= now:
            del tokens[name]


async def call_partner() -> None:
    """Stands for a call to a partner's API, which is down now and then."""


@repeat_every(seconds=60 * 60, retry=Retry(attempts=3, backoff=10, multiplier=2))
async def sync_orders() -> None:
    await call_partner()


@repeat_at(cron="0 9 * * MON-FRI", tz="Europe/Paris")
async def send_digest() -> None: ...
