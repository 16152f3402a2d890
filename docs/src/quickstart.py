from fastapi import FastAPI

from repeat_every import lifespan, repeat_every

rates: dict[str, float] = {}


def fetch_exchange_rates() -> dict[str, float]:
    """Stands for a slow call to another service."""
    return {"EUR": 1.0, "USD": 1.08}


@repeat_every(seconds=30)
def refresh_rates() -> None:  # a def runs in a worker thread: blocking I/O is fine
    rates.update(fetch_exchange_rates())


app = FastAPI(lifespan=lifespan(refresh_rates))


@app.get("/rates")
async def get_rates() -> dict[str, float]:
    return rates
