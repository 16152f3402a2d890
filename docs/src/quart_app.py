from collections.abc import AsyncIterator

from quart import Quart

from repeat_every import repeat_every, run_tasks

app = Quart(__name__)
rates: dict[str, float] = {}


@repeat_every(seconds=30)
def refresh_rates() -> None:
    rates.update({"EUR": 1.0, "USD": 1.08})  # your HTTP call or database query


@app.while_serving
async def periodic_jobs() -> AsyncIterator[None]:
    async with run_tasks(refresh_rates):  # started before serving, stopped after
        yield


@app.get("/rates")
async def get_rates() -> dict[str, float]:
    return rates
