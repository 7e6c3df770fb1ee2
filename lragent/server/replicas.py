"""`lragent serve --replicas N`: N engine replicas on a Ray cluster behind one OpenAI API, with trajectory affinity.

Two Ray Serve deployments:

- `LRAgentEngine` (N replicas): one `LLMEngine` each, serving the unchanged single-server FastAPI app in-process
  (ASGI); a request reaches it as a `ForwardedRequest` and comes back as a `ForwardedResponse`.
- `LRAgentIngress` (1 replica): takes the HTTP traffic, computes each request's `RouteKey` (routing.py) and calls the
  engines' handle. The handle's request router is `TrajectoryRouter`, a Ray Serve custom request router that orders
  the replicas by the routing policy; Ray Serve then probes their queue lengths and skips a full one. When a replica
  dies, its requests in flight fail with an actor error: the ingress re-sends them (they land on a live replica,
  which rebuilds their cache) and the router forgets the dead replica's trajectories.

/metrics: every replica pushes its own /metrics text to a small named Ray actor of the application (the metrics
board) shortly after it serves requests; the ingress merges the board's texts (replica_metrics.py): the sum at
/metrics, each replica's series with a `replica` label at /metrics/replicas. A replica that died keeps its last
series until the application is deleted (its replacement reports under a new id).

The routing table lives in the ingress process, so the ingress runs one replica. Ray is imported lazily: the module
imports without the [replicas] extra (tests/test_packaging.py).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lragent.server.protocol import SESSION_HEADER
from lragent.server.replica_metrics import aggregated, per_replica
from lragent.server.routing import POLICIES, RouteKey, route_key

if TYPE_CHECKING:
    from lragent.config import EngineConfig
    from lragent.server.app import ServerSettings

log = logging.getLogger("lragent.server.replicas")
REPLICA_HEADER = "X-LRAgent-Replica"  # on every response: the replica that served it
RESEND_ATTEMPTS = 4  # a request whose replica died is sent again up to this many times
METRICS_TIMEOUT_S = 10.0
PUSH_DELAY_S = 0.2  # a replica pushes its metrics this long after a request (one push per burst of requests)


@dataclass(frozen=True)
class ForwardedRequest:
    method: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclass(frozen=True)
class ForwardedResponse:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    replica: str


class EngineReplica:
    """One engine and the single-server app (`create_app`), called through ASGI; responses are buffered (a streamed
    response reaches the client in one piece)."""

    def __init__(self, config: EngineConfig, settings: ServerSettings):
        import httpx
        from ray import serve

        from lragent.engine.llm_engine import LLMEngine
        from lragent.server.app import create_app

        self.app = create_app(LLMEngine(config), settings)
        self.app.state.engine_loop.start()  # the app's lifespan does not run under ASGITransport
        transport = httpx.ASGITransport(app=self.app)
        self.client = httpx.AsyncClient(transport=transport, base_url="http://replica", timeout=None)
        context = serve.get_replica_context()
        self.replica_id: str = context.replica_id.unique_id
        self.board = metrics_board(context.app_name)
        keys = settings.keys
        self.auth = {"Authorization": f"Bearer {keys[0]}"} if keys else {}
        self.push_pending = False

    async def forward(self, request: ForwardedRequest, route: RouteKey | None = None) -> ForwardedResponse:
        """Serve one HTTP request; `route` is read by the router only."""
        path = request.path + (f"?{request.query}" if request.query else "")
        resp = await self.client.request(request.method, path, headers=list(request.headers), content=request.body)
        headers = tuple((k, v) for k, v in resp.headers.items() if k.lower() not in ("content-length", "connection"))
        if not self.push_pending:
            self.push_pending = True
            asyncio.get_running_loop().create_task(self.push_metrics())
        return ForwardedResponse(resp.status_code, headers, resp.content, self.replica_id)

    async def push_metrics(self) -> None:
        """This replica's /metrics text onto the application's board, a moment after a burst of requests."""
        await asyncio.sleep(PUSH_DELAY_S)
        self.push_pending = False
        resp = await self.client.get("/metrics", headers=self.auth)
        if resp.status_code == 200:
            await self.board.put.remote(self.replica_id, resp.text)

    def check_health(self) -> None:
        """Ray Serve's health check: a dead engine loop restarts the replica."""
        if not self.app.state.engine_loop.alive:
            raise RuntimeError("the engine loop is not running")

    def __del__(self) -> None:
        app = getattr(self, "app", None)
        if app is not None:
            app.state.engine_loop.stop(timeout=5)


def _app_path(request: Any) -> str:
    """The path below the application's route prefix (Ray Serve puts the prefix in the ASGI root_path)."""
    path, root = request.scope.get("path", "/"), request.scope.get("root_path", "").rstrip("/")
    return path[len(root) :] or "/" if root and path.startswith(root) else path


def _is_replica_failure(exc: BaseException) -> bool:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(exc, ActorDiedError | ActorUnavailableError | RayActorError)


class Ingress:
    """The OpenAI API in front of the replicas: routes /v1/* by trajectory, merges /metrics."""

    def __init__(self, engines: Any):
        from prometheus_client import CollectorRegistry, Counter
        from ray import serve

        self.engines = engines  # DeploymentHandle of LRAgentEngine
        self.board = metrics_board(serve.get_replica_context().app_name)
        self.registry = CollectorRegistry()
        self.routed = Counter(
            "lragent_router_requests", "Requests served, by replica", ["replica"], registry=self.registry
        )
        self.resent = Counter(
            "lragent_router_resent_requests", "Requests sent again after their replica died", registry=self.registry
        )

    async def __call__(self, request: Any) -> Any:  # a starlette Request -> Response
        from starlette.responses import Response

        path = _app_path(request)
        if request.method == "GET" and path in ("/metrics", "/metrics/replicas"):
            return await self.metrics(request, by_replica=path.endswith("/replicas"))
        body = await request.body()
        forwarded = ForwardedRequest(
            request.method, path, request.url.query, tuple(request.headers.items()), bytes(body)
        )
        out = await self.send(forwarded, self.key(request, body))
        self.routed.labels(out.replica).inc()
        headers = dict(out.headers)
        headers[REPLICA_HEADER] = out.replica
        return Response(out.body, status_code=out.status, headers=headers)

    @staticmethod
    def key(request: Any, body: bytes) -> RouteKey:
        if request.method != "POST" or not _app_path(request).startswith("/v1/"):
            return RouteKey()
        try:
            parsed = json.loads(body)
        except ValueError:
            return RouteKey()  # the replica answers 400
        return route_key(parsed, request.headers.get(SESSION_HEADER))

    async def send(self, request: ForwardedRequest, key: RouteKey) -> ForwardedResponse:
        """Send, and send again while the chosen replica dies under it (no request is lost to a dead replica)."""
        for attempt in range(RESEND_ATTEMPTS + 1):
            try:
                return await self.engines.forward.remote(request, route=key)
            except Exception as exc:
                if not _is_replica_failure(exc) or attempt == RESEND_ATTEMPTS:
                    raise
                log.warning("replica failed (%s); sending the request again", type(exc).__name__)
                self.resent.inc()
                await asyncio.sleep(0.1 * (attempt + 1))
        raise AssertionError("unreachable")

    async def metrics(self, request: Any, by_replica: bool) -> Any:
        from prometheus_client import generate_latest
        from starlette.responses import Response

        from lragent.server.metrics import CONTENT_TYPE

        texts = await asyncio.wait_for(self.board.texts.remote(), METRICS_TIMEOUT_S)
        merged = per_replica(texts) if by_replica else aggregated(texts) + generate_latest(self.registry).decode()
        return Response(merged, media_type=CONTENT_TYPE)


@functools.cache
def _board_class() -> Any:
    import ray

    @ray.remote(num_cpus=0)
    class MetricsBoard:
        """Each replica's latest /metrics text, by replica id."""

        def __init__(self) -> None:
            self.latest: dict[str, str] = {}

        def put(self, replica: str, text: str) -> None:
            self.latest[replica] = text

        def texts(self) -> dict[str, str]:
            return dict(self.latest)

    return MetricsBoard


def metrics_board(app_name: str) -> Any:
    """The application's metrics board (a named actor, made by whichever replica asks first)."""
    return _board_class().options(name=f"lragent-metrics::{app_name}", get_if_exists=True, lifetime="detached").remote()


@functools.cache
def trajectory_router_class() -> type:
    """The Ray Serve request router over a routing policy (built on first use: Ray is an optional dependency)."""
    from ray.serve.request_router import RequestRouter

    class TrajectoryRouter(RequestRouter):
        """Orders the replicas by `policy` (routing.POLICIES); Ray Serve takes the first rank with room."""

        def initialize_state(self, policy: str = "affinity", **kwargs: Any) -> None:
            self.policy = POLICIES[policy](**kwargs)
            self.pending: dict[str, str] = {}  # internal request id -> replica id, until completed

        async def choose_replicas(self, candidate_replicas: list, pending_request: Any = None) -> list[list]:
            by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
            return [[by_id[rid]] for rid in self.policy.choose(_route_of(pending_request), list(by_id))]

        def on_request_routed(self, pending_request: Any, replica_id: Any, result: Any) -> None:
            self.policy.record(_route_of(pending_request), replica_id.unique_id)
            self.pending[pending_request.metadata.internal_request_id] = replica_id.unique_id

        def on_request_completed(self, replica_id: Any, internal_request_id: str) -> None:
            if self.pending.pop(internal_request_id, None) is not None:
                self.policy.finished(replica_id.unique_id)

        def on_replica_actor_died(self, replica_id: Any) -> None:
            super().on_replica_actor_died(replica_id)
            self.policy.forget(replica_id.unique_id)

    TrajectoryRouter.__module__, TrajectoryRouter.__qualname__ = __name__, "TrajectoryRouter"  # found by name
    return TrajectoryRouter


def __getattr__(name: str) -> Any:
    """`lragent.server.replicas.TrajectoryRouter`, the import path Ray Serve resolves the router class by."""
    if name == "TrajectoryRouter":
        return trajectory_router_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _route_of(pending_request: Any) -> RouteKey:
    route = None if pending_request is None else pending_request.kwargs.get("route")
    return route if isinstance(route, RouteKey) else RouteKey()


def build_app(
    config: EngineConfig,
    settings: ServerSettings,
    replicas: int,
    routing: str = "affinity",
    gpus_per_replica: float = 0.0,
    cpus_per_replica: float = 1.0,
) -> Any:
    """The Ray Serve application: the ingress bound to `replicas` engine replicas."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    if replicas < 1 or routing not in POLICIES:
        raise ValueError(f"need replicas >= 1 and routing in {sorted(POLICIES)}")
    router = RequestRouterConfig(
        request_router_class=trajectory_router_class(), request_router_kwargs={"policy": routing}
    )
    engine = serve.deployment(
        name="LRAgentEngine",
        num_replicas=replicas,
        max_ongoing_requests=config.max_num_seqs,  # the engine batches; the router skips a replica this busy
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        request_router_config=router,
        health_check_period_s=2,
    )(EngineReplica)
    ingress = serve.deployment(
        name="LRAgentIngress", num_replicas=1, max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0}
    )(Ingress)
    return ingress.bind(engine.bind(config, settings))


def serve_replicas(
    config: EngineConfig,
    settings: ServerSettings,
    replicas: int,
    routing: str,
    host: str,
    port: int,
    gpus_per_replica: float,
) -> None:
    """Join the Ray cluster (RAY_ADDRESS, else a local one), run the application, block until interrupted."""
    import time

    import ray
    from ray import serve

    ray.init()
    serve.start(http_options={"host": host, "port": port})
    cpus = 0.0 if gpus_per_replica else 1.0
    serve.run(build_app(config, settings, replicas, routing, gpus_per_replica, cpus), name="lragent", route_prefix="/")
    log.info("serving %d replicas (%s routing) on http://%s:%d/v1", replicas, routing, host, port)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
