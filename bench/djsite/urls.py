"""``/p<n>/<workload>/``: the workload's view at parallelism n.

n = 1 is the undecorated view (stock Django, or the middleware at its
DEFAULT_PARALLELISM of 1); n > 1, served by the dbset variant only, is the
same view under ``@db_parallelism(n)``.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.http import Http404, HttpRequest, HttpResponse
from django.urls import path

from bench.djsite import views

PARALLELISMS = (1, 2, 4, 8) if settings.VARIANT == "dbset" else (1,)


def _at(view: Any, n: int) -> Any:
    if n == 1:
        return view
    from asgi_dbset import db_parallelism

    return db_parallelism(n)(view)


VIEWS = {
    (n, name): _at(getattr(views, name), n)
    for n in PARALLELISMS
    for name in ("w1", "w1sync", "w2", "w3")
}


async def workload(request: HttpRequest, n: int, name: str) -> HttpResponse:
    # One pattern for every parallelism, so that each resolves the URL at the
    # same cost (a pattern per view would make /p8/ match 9 patterns first).
    view = VIEWS.get((n, name))
    if view is None:
        raise Http404(f"no workload {name!r} at parallelism {n}")
    response: HttpResponse = await view(request)
    return response


urlpatterns = [
    path("health/", views.health),
    path("stats/", views.stats),
    path("p<int:n>/<str:name>/", workload),
]
