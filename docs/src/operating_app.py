"""Operating a job: run it now, pause it, resume it, read its state (docs/operating.md)."""

from fastapi import FastAPI, HTTPException

from repeat_every import TaskHandle, get_handle, lifespan, repeat_every

exported: list[int] = []


@repeat_every(seconds=3600, name="export-orders")
async def export_orders() -> None:
    exported.append(len(exported))  # stands for: write the last hour's orders to the warehouse


# At shutdown, wait up to 20 s for an export in progress, then cancel it (and log it).
app = FastAPI(lifespan=lifespan(export_orders, shutdown_timeout=20))


def running(name: str) -> TaskHandle:
    handle = get_handle(name)
    if handle is None:
        raise HTTPException(404, f"no task named {name!r} is running")
    return handle


# In a real app, protect these routes: anyone who can call them controls your jobs.
@app.get("/tasks/{name}")
async def task_state(name: str) -> dict[str, object]:
    return running(name).state.as_dict()


@app.post("/tasks/{name}/run")
async def run_now(name: str) -> dict[str, object]:
    record = await running(name).run_now()  # waits for a run in progress, never overlaps it
    return {"outcome": record.outcome, "seconds": record.ended - record.started}


@app.post("/tasks/{name}/pause")
async def pause(name: str) -> dict[str, object]:
    running(name).pause()
    return running(name).state.as_dict()


@app.post("/tasks/{name}/resume")
async def resume(name: str) -> dict[str, object]:
    running(name).resume()
    return running(name).state.as_dict()
