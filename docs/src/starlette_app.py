from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from repeat_every import lifespan, repeat_every

rates: dict[str, float] = {}


@repeat_every(seconds=30)
def refresh_rates() -> None:
    rates.update({"EUR": 1.0, "USD": 1.08})  # your HTTP call or database query


async def get_rates(request: Request) -> JSONResponse:
    return JSONResponse(rates)


app = Starlette(routes=[Route("/rates", get_rates)], lifespan=lifespan(refresh_rates))
