from fastapi import FastAPI

from repeat_every import lifespan, repeat_every

stats = {"refreshes": 0}


@repeat_every(seconds=30)
def refresh_stats() -> None:  # a def: runs in a worker thread
    stats["refreshes"] += 1


app = FastAPI(lifespan=lifespan(refresh_stats))


@app.get("/stats")
def get_stats() -> dict[str, int]:
    return stats
