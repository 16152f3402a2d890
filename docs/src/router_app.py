"""The status router: the jobs' state, their health, and controls behind a token."""

import os
import secrets

from fastapi import Depends, FastAPI, Header, HTTPException

from repeat_every import lifespan, repeat_every
from repeat_every.fastapi import tasks_router

ADMIN_TOKEN = os.environ.get("ADMIN_TOKEN", "change-me")


def send_to_warehouse() -> None: ...  # stands for: upload the last hour's invoices


@repeat_every(seconds=60 * 60, timeout=10 * 60, name="export-invoices")
async def export_invoices() -> None:
    send_to_warehouse()


def verify_token(authorization: str = Header("")) -> None:
    """Let through only the callers that send ``Authorization: Bearer <ADMIN_TOKEN>``."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise HTTPException(401, "a bearer token is needed", {"WWW-Authenticate": "Bearer"})
    if not secrets.compare_digest(token.encode(), ADMIN_TOKEN.encode()):
        raise HTTPException(403, "this token may not control the jobs")


app = FastAPI(lifespan=lifespan(export_invoices))
# GET /tasks, GET /tasks/{name}, GET /health/tasks, and (behind verify_token)
# POST /tasks/{name}/run, /pause and /resume.
app.include_router(tasks_router(export_invoices, control=True, authorize=Depends(verify_token)))
