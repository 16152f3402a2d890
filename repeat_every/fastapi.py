"""FastAPI routes that show periodic tasks, check their health and (behind authorisation)
control them: ``app.include_router(tasks_router(cleanup, report))``.

Importing this module imports FastAPI and Pydantic; ``import repeat_every`` imports neither.
docs/operating.md explains each route and each decision (which tasks, the health rule, what a
failed ``POST …/run`` answers).
"""

import asyncio
import datetime as dt
import inspect
from collections.abc import Callable, Mapping
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Response
from fastapi import Depends as depends
from fastapi import Security as security
from fastapi.params import Depends
from pydantic import BaseModel

from ._cron import Cron
from ._durations import NS, Seconds, duration_ns
from ._schedule import AlignedRate, Schedule
from ._task import PeriodicTask, TaskHandle, running_handles
from .stores._common import owner, redact_url

__all__ = [
    "UNTIMED_RUN_SECONDS",
    "FleetClaim",
    "FleetRun",
    "FleetStatus",
    "HealthReport",
    "RunResult",
    "TaskHealth",
    "TaskInfo",
    "TasksReport",
    "tasks_router",
]

UNTIMED_RUN_SECONDS = 60.0
"""What the health rule allows a run of a task without ``timeout`` (see `tasks_router`)."""

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_ERROR_CHARS = 500  # of a store's error text in a response
_NOT_FOUND: dict[str, Any] = {"description": "No task of that name"}
_NOT_RUNNING: dict[str, Any] = {"description": "The task is not running"}


# -- what the routes answer ------------------------------------------------------------------------


class FleetClaim(BaseModel):
    """The last tick of the task a worker won in the store."""

    tick: int
    at: dt.datetime
    worker: str
    """``host:pid`` of the worker that won it."""


class FleetRun(BaseModel):
    """A run some worker recorded in the store: the task's last success, or last failure."""

    tick: int
    started_at: dt.datetime
    ended_at: dt.datetime
    duration: float
    """Seconds the run took (retries included)."""
    worker: str
    """``host:pid`` of the worker that ran it."""
    error: str | None
    """The failure's text; ``None`` for a success."""


class FleetStatus(BaseModel):
    """What the task's claim store knows of it, written by every worker that shares the store."""

    store: str
    """The store (its ``repr``: no password)."""
    error: str | None = None
    """Why the store could not be read (the other fields are then ``None``)."""
    last_claim: FleetClaim | None = None
    last_success: FleetRun | None = None
    last_failure: FleetRun | None = None


class TaskHealth(BaseModel):
    """Whether a task is healthy, and why (see `tasks_router` for the rule)."""

    name: str
    healthy: bool
    reason: str
    """In words: ``"ok: …"``, ``"paused"``, ``"stale: …"``, ``"not running: …"``."""
    last_success_at: dt.datetime | None
    """The latest success known, in this worker or (with a store) anywhere in the fleet."""
    expected_since: dt.datetime | None
    """A success at or after this instant keeps the task healthy (``None``: no rule applied)."""


class TaskInfo(BaseModel):
    """One task as ``GET /tasks/{name}`` shows it: its state in this worker, its health, and
    what its claim store knows fleet-wide (``fleet``, ``None`` without a store)."""

    name: str
    schedule: str
    """When it runs, in words (``every 3600 s, aligned to the wall clock``)."""
    health: TaskHealth
    # Its TaskState in this worker (TaskState.as_dict()); a task never started has the
    # defaults.
    running: bool = False
    paused: bool = False
    started_at: dt.datetime | None = None
    """When its loop started in this worker (``None``: never started)."""
    runs: int = 0
    failures: int = 0
    retries: int = 0
    skipped: int = 0
    elsewhere: int = 0
    paused_ticks: int = 0
    consecutive_failures: int = 0
    last_error: str | None = None
    last_started_at: dt.datetime | None = None
    last_success_at: dt.datetime | None = None
    """When its last successful run in this worker ended."""
    last_duration: float | None = None
    next_run_at: dt.datetime | None = None
    fleet: FleetStatus | None


class TasksReport(BaseModel):
    """``GET /tasks``: the worker that answered (``host:pid``) and its tasks, by name."""

    worker: str
    tasks: list[TaskInfo]


class HealthReport(BaseModel):
    """The health route's answer (status 200 when ``healthy``, else 503)."""

    healthy: bool
    detail: str
    """One line naming each unhealthy task and why (``"ok"`` when all are healthy)."""
    unhealthy: list[str]
    """The names of the unhealthy tasks."""
    tasks: list[TaskHealth]


class RunResult(BaseModel):
    """``POST /tasks/{name}/run``: the last attempt of the run it made (from its ``RunRecord``)."""

    task: str
    ok: bool
    outcome: Literal["ok", "failed", "timeout", "cancelled"]
    error: str | None
    """``repr`` of the exception the job raised; ``None`` when it returned."""
    attempt: int
    started_at: dt.datetime
    duration: float
    """Seconds the attempt took."""


# -- the router ------------------------------------------------------------------------------------


def tasks_router(
    *tasks: PeriodicTask[Any] | TaskHandle,
    store: Any = None,
    staleness: Seconds | Mapping[str, Seconds] | None = None,
    control: bool = False,
    authorize: Depends | Callable[..., Any] | None = None,
    path: str = "/tasks",
    health_path: str = "/health/tasks",
    store_timeout: Seconds = 0.5,
    tags: list[str] | None = None,
) -> APIRouter:
    """A FastAPI router that shows periodic tasks, checks their health and may control them.

    ``app.include_router(tasks_router())`` adds:

    - ``GET /tasks``: every task, as [`TasksReport`][] (``worker``: the ``host:pid`` that
      answered; ``tasks``: one [`TaskInfo`][] each, by name);
    - ``GET /tasks/{name}``: one task (404 naming the known tasks when there is none of that
      name);
    - ``GET /health/tasks``: [`HealthReport`][], status 200 when every task is healthy, 503
      naming each one that is not;
    - with ``control=True`` only: ``POST /tasks/{name}/run`` (``handle.run_now()``, answers
      [`RunResult`][]), ``POST /tasks/{name}/pause`` and ``POST /tasks/{name}/resume``
      (answer [`TaskInfo`][]); 409 when the task is not running.

    **Which tasks.** The ``tasks`` given (decorated functions or handles; a function shows
    its latest loop), in that order; with none, every task running in the event loop that
    serves the request, at the time of the request. Give them: a task whose loop has died is
    then reported (``running: false``, unhealthy), where the default view no longer lists it.

    **Fleet view.** ``fleet`` shows what the task's claim store (or ``store``, for every task)
    knows: the last claim, the last success and the last failure anywhere, with the worker's
    ``host:pid``. A store that fails or takes longer than ``store_timeout`` seconds (default
    0.5 s, under the 1 s of a Kubernetes probe) is shown with its error text; the route still
    answers 200.

    **Health.** A running task is healthy while its latest success (in this worker, or in the
    fleet when the store knows a later one) is at or after ``expected_since``; before any
    success, its loop's start counts as one (a grace from start). By default
    ``expected_since`` is the tick before the latest one that has had its run budget to end
    (two ticks missed in a row make a task unhealthy: one failure is tolerated, the next tick
    may recover it), where the run budget is the task's ``jitter`` plus ``attempts × timeout``
    and the retry backoffs ([`UNTIMED_RUN_SECONDS`][] stands for a task without ``timeout``).
    For a task on a process-local grid, that is two periods plus the budget ago. ``staleness``
    (seconds or a ``timedelta``; or a mapping from task names to them) replaces the rule by a
    plain age. A paused task is healthy (pausing is a decision); a loop that ended by an
    exception, or a task given but not started, is not; a loop that was stopped, or ran its
    ``max_repetitions``, is.

    **Control.** Off by default. ``control=True`` requires ``authorize``: a FastAPI
    dependency (``Depends(verify_token)``, or the function itself) that raises
    ``HTTPException(401 or 403)`` for a caller who may not control the jobs; it guards the
    three ``POST`` routes. ``POST …/run`` answers 200 with the record whatever the job did
    (``ok``, ``outcome``, ``error`` say it); a failure is also logged and reported as any
    failure is, and with ``raise_exceptions=True`` it ends the loop. A run keeps going if the
    caller disconnects. To protect the read routes too, give FastAPI's own
    ``include_router(router, dependencies=[...])``.

    ``path`` and ``health_path`` place the routes; ``tags`` groups them in the OpenAPI docs.
    """
    view = _View(
        _given(tasks),
        _check_store(store),
        _check_staleness(staleness),
        _check_timeout(store_timeout),
    )
    path, health_path = _check_paths(path, health_path)
    guard = _check_control(control, authorize)
    router = APIRouter(tags=list(tags) if tags is not None else ["tasks"])

    @router.get(path, response_model=TasksReport, summary="Every periodic task")
    async def list_tasks() -> TasksReport:
        """Each periodic task: its state in this worker, its health, its fleet-wide records."""
        return TasksReport(worker=owner(), tasks=await view.infos(view.entries()))

    @router.get(
        health_path,
        response_model=HealthReport,
        summary="Health of the tasks",
        responses={503: {"model": HealthReport, "description": "A task is unhealthy"}},
    )
    async def health(response: Response) -> HealthReport:
        """200 when every task is healthy; 503 naming each task that is not."""
        infos = await view.infos(view.entries())
        report = _report([info.health for info in infos])
        response.status_code = 200 if report.healthy else 503
        return report

    @router.get(
        path + "/{name:path}",
        response_model=TaskInfo,
        summary="One periodic task",
        responses={404: _NOT_FOUND},
    )
    async def get_task(name: str) -> TaskInfo:
        """One task by name; 404 if the router has none of that name."""
        (info,) = await view.infos([view.entry(name)])
        return info

    if guard is None:
        return router

    @router.post(
        path + "/{name:path}/run",
        responses={404: _NOT_FOUND, 409: _NOT_RUNNING},
        response_model=RunResult,
        dependencies=[guard],
        summary="Run a task now",
    )
    async def run(name: str) -> RunResult:
        """Run the task once now (waits for a run in progress); answers its last attempt."""
        handle = view.running(name)
        started = asyncio.ensure_future(handle.run_now())
        view.runs.add(started)
        started.add_done_callback(view.run_done)
        try:
            record = await asyncio.shield(started)  # a caller who hangs up does not cancel it
        except RuntimeError as exc:  # pragma: no cover - a stop between the check and the run
            raise HTTPException(409, str(exc)) from None
        return RunResult(
            task=record.task,
            ok=record.ok,
            outcome=record.outcome,
            error=None if record.exception is None else repr(record.exception),
            attempt=record.attempt,
            started_at=record.wall_started,
            duration=record.ended - record.started,
        )

    @router.post(
        path + "/{name:path}/pause",
        responses={404: _NOT_FOUND, 409: _NOT_RUNNING},
        response_model=TaskInfo,
        dependencies=[guard],
        summary="Pause a task",
    )
    async def pause(name: str) -> TaskInfo:
        """Run no tick of the task until it is resumed (a run in progress finishes)."""
        view.running(name).pause()
        return await get_task(name)

    @router.post(
        path + "/{name:path}/resume",
        responses={404: _NOT_FOUND, 409: _NOT_RUNNING},
        response_model=TaskInfo,
        dependencies=[guard],
        summary="Resume a task",
    )
    async def resume(name: str) -> TaskInfo:
        """Undo pause: the next tick on the schedule runs."""
        view.running(name).resume()
        return await get_task(name)

    return router


# -- checks made when the router is built ----------------------------------------------------------


def _given(tasks: tuple[object, ...]) -> list[PeriodicTask[Any] | TaskHandle] | None:
    if not tasks:
        return None
    given: list[PeriodicTask[Any] | TaskHandle] = []
    for task in tasks:
        if not isinstance(task, (PeriodicTask, TaskHandle)):
            raise TypeError(
                "tasks_router takes periodic tasks (the functions @repeat_every or @repeat_at "
                f"decorated) or their handles, got {task!r}"
            )
        if any(task.name == other.name for other in given):
            raise ValueError(
                f"two tasks named {task.name!r} given to tasks_router: a task's name is its URL "
                "(/tasks/{name}); give one of them another name="
            )
        given.append(task)
    return given


def _check_store(store: object) -> object:
    if store is not None and not inspect.iscoroutinefunction(getattr(store, "status", None)):
        raise TypeError(
            "store must have an async status(task) method, as the stores of repeat_every.stores "
            f"do (e.g. store=SQLiteClaimStore(path)); {store!r} has none"
        )
    return store


def _check_staleness(staleness: object) -> int | dict[str, int] | None:
    if staleness is None:
        return None
    if isinstance(staleness, Mapping):
        return {
            str(name): duration_ns(value, f"staleness[{name!r}]")
            for name, value in staleness.items()
        }
    return duration_ns(staleness, "staleness")


def _check_timeout(seconds: object) -> float:
    return duration_ns(seconds, "store_timeout") / NS


def _check_paths(path: object, health_path: object) -> tuple[str, str]:
    for value, argument in ((path, "path"), (health_path, "health_path")):
        if not isinstance(value, str) or not value.startswith("/") or value.endswith("/"):
            raise ValueError(
                f"{argument} must be a URL path that starts with '/' and does not end with one "
                f"(e.g. '/tasks'), got {value!r}"
            )
    assert isinstance(path, str)
    assert isinstance(health_path, str)
    if health_path.startswith(path + "/"):
        raise ValueError(
            f"health_path {health_path!r} lies under path {path!r}: it would read as the task "
            f"named {health_path[len(path) + 1 :]!r}; put it elsewhere (the default is "
            "'/health/tasks')"
        )
    return path, health_path


def _check_control(control: object, authorize: object) -> Depends | None:
    if not isinstance(control, bool):
        raise TypeError(f"control must be True or False, got {control!r}")
    if not control:
        if authorize is not None:
            raise ValueError(
                "authorize= guards the control routes, and control=False leaves them out; give "
                "control=True to add them, or drop authorize= (to protect the read routes, "
                "write app.include_router(router, dependencies=[Depends(...)]))"
            )
        return None
    if authorize is None:
        raise ValueError(
            "control=True adds POST /tasks/{name}/run, /pause and /resume, and whoever can call "
            "them runs and stops your jobs: give authorize= a FastAPI dependency that refuses "
            "other callers (raises HTTPException(401) or (403)), e.g. "
            "tasks_router(control=True, authorize=Depends(verify_token))"
        )
    if isinstance(authorize, Depends):
        return authorize
    if authorize is depends or authorize is security or isinstance(authorize, type):
        raise TypeError(
            "authorize must be a dependency such as Depends(verify_token), not the Depends "
            "class itself"
        )
    if callable(authorize):
        return Depends(authorize)
    raise TypeError(
        f"authorize must be a FastAPI dependency such as Depends(verify_token), got {authorize!r}"
    )


# -- reading the tasks -----------------------------------------------------------------------------


class _Entry:
    """A task as the router sees it: its name, its latest handle (if any), its task."""

    __slots__ = ("handle", "name", "task")

    def __init__(self, name: str, handle: TaskHandle | None, task: PeriodicTask[Any]) -> None:
        self.name = name
        self.handle = handle
        self.task = task


class _View:
    """The tasks of one router, and how each is read, checked and found."""

    def __init__(
        self,
        given: list[PeriodicTask[Any] | TaskHandle] | None,
        store: object,
        staleness: int | dict[str, int] | None,
        store_timeout: float,
    ) -> None:
        self.given = given
        self.store = store
        self.staleness = staleness
        self.store_timeout = store_timeout
        self.runs: set[asyncio.Future[Any]] = set()  # POST …/run runs, kept alive

    def entries(self) -> list[_Entry]:
        if self.given is not None:
            return [_entry_of(task) for task in self.given]
        loop = asyncio.get_running_loop()
        handles = [h for h in running_handles() if h._runner.loop is loop]
        handles.sort(key=lambda h: (h.name, h._start_wall))
        return [_Entry(h.name, h, h.task) for h in handles]

    def entry(self, name: str) -> _Entry:
        found = [entry for entry in self.entries() if entry.name == name]
        if not found:
            known = ", ".join(repr(entry.name) for entry in self.entries()) or "none"
            raise HTTPException(404, f"no task named {name!r} here (tasks: {known})")
        return found[-1]  # several running loops share a name only with a claim store

    def running(self, name: str) -> TaskHandle:
        handle = self.entry(name).handle
        if handle is None or handle.done:
            raise HTTPException(409, f"{name!r} is not running")
        return handle

    def run_done(self, run: asyncio.Future[Any]) -> None:
        self.runs.discard(run)
        if not run.cancelled():
            run.exception()  # retrieved, when its caller hung up before it ended

    async def infos(self, entries: list[_Entry]) -> list[TaskInfo]:
        """The tasks as the routes show them, each store read once, all stores at once."""
        stores: list[Any] = [self.store or _own_store(entry.task) for entry in entries]
        names: dict[int, tuple[Any, set[str]]] = {}  # by store: the store, its tasks' names
        for store, entry in zip(stores, entries, strict=True):
            if store is not None:
                names.setdefault(id(store), (store, set()))[1].add(entry.name)
        read = await asyncio.gather(*(self.fleet(store, tasks) for store, tasks in names.values()))
        fleets = dict(zip(names, read, strict=True))
        return [
            self.info(entry, None if store is None else fleets[id(store)][entry.name])
            for store, entry in zip(stores, entries, strict=True)
        ]

    async def fleet(self, store: Any, names: set[str]) -> dict[str, FleetStatus]:
        """What ``store`` knows of the tasks ``names``: one ``statuses()`` read for several
        tasks (when the store has it), else one ``status(name)`` each; an error for all when
        the store fails or is slower than ``store_timeout``."""
        shown = redact_url(repr(store))
        if not inspect.iscoroutinefunction(getattr(store, "status", None)):
            error = "this store keeps no run records (no status())"
            return {name: FleetStatus(store=shown, error=error) for name in names}
        try:
            if len(names) > 1 and inspect.iscoroutinefunction(getattr(store, "statuses", None)):
                every = await asyncio.wait_for(store.statuses(), self.store_timeout)
                known = {status.task: status for status in every}
            else:
                reads = asyncio.gather(*(store.status(name) for name in names))
                known = {
                    status.task: status
                    for status in await asyncio.wait_for(reads, self.store_timeout)
                }
            return {name: _fleet_status(shown, known.get(name)) for name in names}
        except asyncio.TimeoutError:
            error = f"no answer from the store in {self.store_timeout:g} s"
        except Exception as exc:
            error = redact_url(f"{type(exc).__name__}: {exc}")[:_ERROR_CHARS]
        return {name: FleetStatus(store=shown, error=error) for name in names}

    def info(self, entry: _Entry, fleet: FleetStatus | None) -> TaskInfo:
        handle = entry.handle
        health = self.health(entry, fleet)
        if handle is None:
            schedule = entry.task.schedule.describe()
            return TaskInfo(name=entry.name, schedule=schedule, health=health, fleet=fleet)
        return TaskInfo.model_validate(
            {
                **handle.state.as_dict(),
                "name": entry.name,
                "schedule": handle.schedule.describe(),
                "started_at": handle.started_at,
                "health": health,
                "fleet": fleet,
            }
        )

    def health(self, entry: _Entry, fleet: FleetStatus | None) -> TaskHealth:
        handle = entry.handle
        name = entry.name
        local = None if handle is None else handle.state.last_success_at
        remote = None if fleet is None or fleet.last_success is None else fleet.last_success
        latest, where = local, "in this worker"
        if remote is not None and (latest is None or remote.ended_at >= latest):
            latest, where = remote.ended_at, f"on {remote.worker}"

        def verdict(healthy: bool, reason: str, since: dt.datetime | None = None) -> TaskHealth:
            return TaskHealth(
                name=name,
                healthy=healthy,
                reason=reason,
                last_success_at=latest,
                expected_since=since,
            )

        if handle is None:
            return verdict(False, "not running: never started")
        if handle.done:
            if handle.exception is not None:
                return verdict(False, f"not running: its loop ended with {handle.exception!r}")
            return verdict(True, "ok: ended (stopped, or ran its max_repetitions)")
        if handle.paused:
            return verdict(True, "paused")
        now = round(handle._runner.clock.wall() * NS)
        since_ns = self.expected_since(handle, now)
        if since_ns is None:
            return verdict(True, "ok: its schedule had no two ticks in the last 5 years")
        since = _utc(since_ns)
        grace = _utc(round(handle._start_wall * NS) + _first_delay(handle.task.schedule))
        resumed = handle._runner.resumed_wall  # the ticks of a pause are not failures
        resumed_at = None if resumed is None else _utc(round(resumed * NS))
        if resumed_at is not None and resumed_at > grace:
            grace = resumed_at
        if latest is not None and latest >= since:
            return verdict(True, f"ok: last success at {latest.isoformat()} {where}", since)
        if grace >= since:
            if grace == resumed_at:
                return verdict(
                    True, f"ok: resumed at {grace.isoformat()}; its grace runs from then", since
                )
            return verdict(
                True, f"ok: no success yet; its grace runs from {grace.isoformat()}", since
            )
        if latest is None:
            last = f"no success since its grace began at {grace.isoformat()}"
        else:
            last = f"last success at {latest.isoformat()} {where}"
        return verdict(False, f"stale: {last}; one was expected since {since.isoformat()}", since)

    def expected_since(self, handle: TaskHandle, now: int) -> int | None:
        """Wall-clock ns since the epoch from which a success is expected (``None``: no rule)."""
        staleness = self.staleness
        if isinstance(staleness, dict):
            staleness = staleness.get(handle.name)
        if staleness is not None:
            return now - staleness
        schedule = handle.schedule
        latest = now - _budget(handle)  # a tick due before this has had its time to run
        if isinstance(schedule, AlignedRate):
            key = (latest - schedule.offset) // schedule.period
            return (key - 1) * schedule.period + schedule.offset
        if isinstance(schedule, Cron):
            after = schedule._first_at_or_after(latest // NS + 1)
            window = latest - 5 * 366 * 86_400 * NS  # how far back fire times are looked for
            last = schedule.last_key_before(after, window)
            before = None if last is None else schedule.last_key_before(last, window)
            return None if before is None else before * NS
        period = getattr(schedule, "period", None)
        if isinstance(period, int):  # FixedRate, FixedDelay: a grid of this process
            return latest - 2 * period
        return None  # pragma: no cover - every schedule of the library is handled above


def _entry_of(task: PeriodicTask[Any] | TaskHandle) -> _Entry:
    if isinstance(task, TaskHandle):
        return _Entry(task.name, task, task.task)
    return _Entry(task.name, task.handle, task)


def _own_store(task: PeriodicTask[Any]) -> Any:
    return task._options.store


def _budget(handle: TaskHandle) -> int:
    """Nanoseconds a run of ``handle``'s task may take after its tick: its jitter, every
    attempt's timeout (`UNTIMED_RUN_SECONDS` without one), the retry backoffs."""
    opts = handle._runner.opts
    retry = opts.retry
    attempts = 1 if retry is None else retry.attempts
    per_attempt = (
        opts.timeout_ns if opts.timeout_ns is not None else round(UNTIMED_RUN_SECONDS * NS)
    )
    backoff = 0.0 if retry is None else sum(retry.delays()) + retry.jitter * (attempts - 1)
    return opts.jitter_ns + attempts * per_attempt + round(backoff * NS)


def _first_delay(schedule: Schedule) -> int:
    delay = getattr(schedule, "first_delay", 0)
    return delay if isinstance(delay, int) else 0


def _utc(ns: int) -> dt.datetime:
    whole, part = divmod(ns, NS)
    return _EPOCH + dt.timedelta(seconds=whole, microseconds=part // 1000)


def _fleet_status(store: str, status: Any) -> FleetStatus:
    if status is None:  # a task the store never saw
        return FleetStatus(store=store)
    return FleetStatus(
        store=store,
        last_claim=_claim(status.last_claim),
        last_success=_run(status.last_success),
        last_failure=_run(status.last_failure),
    )


def _claim(claim: Any) -> FleetClaim | None:
    if claim is None:
        return None
    return FleetClaim(tick=claim.tick, at=claim.at, worker=claim.worker)


def _run(run: Any) -> FleetRun | None:
    if run is None:
        return None
    return FleetRun(
        tick=run.tick,
        started_at=run.started_at,
        ended_at=run.started_at + dt.timedelta(seconds=run.duration),
        duration=run.duration,
        worker=run.worker,
        error=run.error,
    )


def _report(healths: list[TaskHealth]) -> HealthReport:
    bad = [health for health in healths if not health.healthy]
    detail = "; ".join(f"{health.name}: {health.reason}" for health in bad)
    return HealthReport(
        healthy=not bad,
        detail=f"{len(bad)} of {len(healths)} task(s) unhealthy: {detail}" if bad else "ok",
        unhealthy=[health.name for health in bad],
        tasks=healths,
    )
