from litestar import Litestar, get

from repeat_every import lifespan, repeat_every

rates: dict[str, float] = {}


@repeat_every(seconds=30)
def refresh_rates() -> None:
    rates.update({"EUR": 1.0, "USD": 1.08})  # your HTTP call or database query


@get("/rates", sync_to_thread=False)
def get_rates() -> dict[str, float]:
    return rates


# lifespan=[...], not on_startup=[refresh_rates]: see below.
app = Litestar(route_handlers=[get_rates], lifespan=[lifespan(refresh_rates)])
