from django.core.cache import cache
from django.http import HttpRequest, JsonResponse
from django.urls import path

from mysite.jobs import refresh_rates


def rates(request: HttpRequest) -> JsonResponse:
    return JsonResponse(cache.get("rates", {}))


async def tasks(request: HttpRequest) -> JsonResponse:  # async: reads the handle on the loop
    handle = refresh_rates.handle
    return JsonResponse(handle.state.as_dict() if handle else {})


urlpatterns = [path("rates", rates), path("tasks", tasks)]
