from repeat_every import repeat_at


@repeat_at(cron="0 9 * * MON-FRI", tz="Europe/Paris")  # 09:00 in Paris, all year
def send_digest() -> None: ...


@repeat_at(cron="0 0 1 * *", tz="America/New_York")  # midnight in New York, each 1st
def close_the_month() -> None: ...


@repeat_at(cron="*/15 * * * *")  # every quarter hour (in UTC or not: the same)
def poll_the_feed() -> None: ...
