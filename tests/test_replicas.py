"""Data-parallel replicas with trajectory affinity (`lragent serve --replicas N`): the routing policies in plain
Python, then a local Ray cluster with two replicas of the embedded model (SmolLM2-135M, three shared-A role adapters,
base_lr_shared) behind the Ray Serve ingress, against a single-engine server as the reference.
"""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
from loopback import serve
from prometheus_client.parser import text_string_to_metric_families

from lragent.config import EngineConfig
from lragent.engine.llm_engine import LLMEngine
from lragent.server import ServerSettings, create_app
from lragent.server.routing import RoundRobin, RouteKey, TrajectoryAffinity, route_key, text_hashes

MODEL = "smollm2-135m-instruct"
HEADER = "X-LRAgent-Replica"
QUESTIONS = (
    "Which magazine was started first, Arthur's Magazine or First for Women?",
    "Were Scott Derrickson and Ed Wood of the same nationality?",
    "What government position was held by the woman who portrayed Corliss Archer in Kiss and Tell?",
    "Which city hosted the first modern Olympic Games, and in which year were they held?",
)
CONTEXT = (
    "Observation: Arthur's Magazine (1844-1846) was an American literary periodical published in Philadelphia "
    "in the 19th century. Edited by Timothy Shay Arthur, it featured work by Edgar A. Poe and others.\n"
)
STEPS = (("plan", "Thought:"), ("action", "Thought: I should look it up.\nAction:"), ("reflect", "Reflection:"))


def trajectory_prompts(question: str) -> list[tuple[str, str]]:
    """(adapter, prompt) of a plan -> action -> reflect trajectory: each prompt extends the shared prefix."""
    prefix = f"Question: {question}\n{CONTEXT}"
    return [(role, prefix + tail) for role, tail in STEPS]


# ---- the policies, no Ray ---------------------------------------------------------------------------------------


def test_route_keys_share_the_trajectory_prefix():
    plan, action, _ = trajectory_prompts(QUESTIONS[0])
    a = route_key({"model": "plan", "prompt": plan[1]}, None)
    b = route_key({"model": "action", "prompt": action[1]}, None)
    assert len(a.prefix) >= 3 and b.prefix[: len(a.prefix) - 1] == a.prefix[:-1]  # the adapter is not in the key
    other = route_key({"model": "plan", "prompt": trajectory_prompts(QUESTIONS[1])[0][1]}, None)
    assert not set(other.prefix) & set(a.prefix)
    assert route_key({"prompt": "x", "session_id": "s1"}, None).session == "s1"
    assert route_key({"prompt": "x", "session_id": "s1"}, "hdr").session == "hdr"  # the header wins
    chat = route_key({"messages": [{"role": "user", "content": plan[1]}]}, None)
    assert chat.prefix and route_key({"prompt": list(range(40))}, None).prefix != ()


def test_affinity_policy_keeps_trajectories_and_balances_new_ones():
    policy, replicas = TrajectoryAffinity(), ["r0", "r1"]
    placed = {}
    for q in QUESTIONS:
        for _, prompt in trajectory_prompts(q):
            key = RouteKey(prefix=text_hashes(prompt))
            chosen = policy.choose(key, replicas)[0]
            policy.record(key, chosen)
            policy.finished(chosen)
            placed.setdefault(q, set()).add(chosen)
    assert all(len(s) == 1 for s in placed.values())
    assert {next(iter(s)) for s in placed.values()} == set(replicas)  # new trajectories spread
    policy.forget("r0")
    key = RouteKey(prefix=text_hashes(trajectory_prompts(QUESTIONS[0])[2][1]))
    assert policy.choose(key, ["r1"]) == ["r1"]
    session = RouteKey(session="s")
    policy.record(session, "r1")
    assert policy.choose(session, ["r0", "r1"])[0] == "r1"


def test_round_robin_scatters_a_trajectory():
    policy, seen = RoundRobin(), set()
    for _, prompt in trajectory_prompts(QUESTIONS[0]):
        chosen = policy.choose(RouteKey(prefix=text_hashes(prompt)), ["r0", "r1"])[0]
        policy.record(RouteKey(), chosen)
        seen.add(chosen)
    assert seen == {"r0", "r1"}


# ---- a local Ray cluster ----------------------------------------------------------------------------------------


def engine_config(adapters: dict[str, str]) -> EngineConfig:
    return EngineConfig(adapters=adapters, sharing="base_lr_shared", kv_cache_bytes=32 << 20, max_model_len=512)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_serve():
    ray = pytest.importorskip("ray")  # the [replicas] extra
    serve = pytest.importorskip("ray.serve")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=80 << 20,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}},
        log_to_driver=False,
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield serve, f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def deploy(ray_serve, adapters: dict[str, str], routing: str, name: str) -> str:
    from lragent.server.replicas import build_app

    serve, url = ray_serve
    app = build_app(engine_config(adapters), ServerSettings(), 2, routing, cpus_per_replica=0)
    serve.run(app, name=name, route_prefix=f"/{name}")
    return f"{url}/{name}"


@pytest.fixture(scope="module")
def affinity_url(ray_serve, shared_a_adapters):
    return deploy(ray_serve, shared_a_adapters, "affinity", "aff")


@pytest.fixture(scope="module")
def single_url(shared_a_adapters):
    with serve(create_app(LLMEngine(engine_config(shared_a_adapters)), ServerSettings())) as url:
        yield url


def complete(url: str, model: str, prompt: str, session: str | None = None, max_tokens: int = 1) -> httpx.Response:
    headers = {} if session is None else {"X-Session-ID": session}
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    out = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=120)
    assert out.status_code == 200, out.text
    return out


def run_trajectory(url: str, question: str, session: str | None = None, max_tokens: int = 1) -> list[tuple[str, int]]:
    """(replica, cached tokens) of each request of one trajectory."""
    out = []
    for role, prompt in trajectory_prompts(question):
        resp = complete(url, role, prompt, session, max_tokens)
        out.append((resp.headers.get(HEADER, ""), resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"]))
    return out


def test_trajectories_stay_on_one_replica_with_single_engine_reuse(affinity_url, single_url):
    runs = {q: run_trajectory(affinity_url, q, session=f"s{i}" if i % 2 else None) for i, q in enumerate(QUESTIONS)}
    for q, steps in runs.items():
        assert len({replica for replica, _ in steps}) == 1, (q, steps)  # all agents of a trajectory on one replica
        reference = [cached for _, cached in run_trajectory(single_url, q)]
        assert [cached for _, cached in steps] == reference  # the cross-agent reuse of one engine
        assert reference[1] > 0 and reference[2] > 0
    assert len({steps[0][0] for steps in runs.values()}) == 2  # new trajectories use both replicas


def test_metrics_per_replica_and_aggregated(affinity_url):
    def samples(path: str) -> dict:
        text = httpx.get(f"{affinity_url}{path}", timeout=60).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text)
                for s in f.samples}  # fmt: skip

    name = "lragent_prompt_tokens_total"
    deadline = time.monotonic() + 20  # replicas push their metrics a moment after they serve
    while True:
        per, total = samples("/metrics/replicas"), samples("/metrics")
        by_replica: dict[str, float] = {}
        for (sample, labels), v in per.items():
            if sample == name:
                replica = dict(labels)["replica"]
                by_replica[replica] = by_replica.get(replica, 0.0) + v
        if len(by_replica) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(by_replica) == 2 and all(v > 0 for v in by_replica.values())
    summed = sum(v for (sample, _), v in total.items() if sample == name)  # over its other labels (adapter, ...)
    assert summed == pytest.approx(sum(by_replica.values()))
    assert sum(v for k, v in total.items() if k[0] == "lragent_router_requests_total") > 0


def test_round_robin_scatters_trajectories(ray_serve, shared_a_adapters):
    pytest.importorskip("ray")
    serve, _ = ray_serve
    url = deploy(ray_serve, shared_a_adapters, "round_robin", "rr")
    try:
        steps = run_trajectory(url, QUESTIONS[0])
        assert len({replica for replica, _ in steps}) == 2  # agents of one trajectory on different replicas
    finally:
        serve.delete("rr")


def test_killing_a_replica_loses_no_request(affinity_url):
    import ray

    results: dict[str, list] = {}
    errors: list[BaseException] = []
    started = threading.Barrier(len(QUESTIONS) + 1)

    def worker(i: int, question: str) -> None:
        try:
            started.wait()
            results[question] = run_trajectory(affinity_url, f"{question} (run 2)", session=f"k{i}", max_tokens=12)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i, q)) for i, q in enumerate(QUESTIONS)]
    for t in threads:
        t.start()
    started.wait()
    time.sleep(1.0)  # the first requests are in flight
    victim = complete(affinity_url, "plan", trajectory_prompts(QUESTIONS[0])[0][1], session="k0").headers[HEADER]
    ray.kill(ray.get_actor(f"SERVE_REPLICA::aff#LRAgentEngine#{victim}", namespace="serve"), no_restart=True)
    for t in threads:
        t.join(180)
    assert not errors, errors
    assert len(results) == len(QUESTIONS) and all(len(steps) == 3 for steps in results.values())
    moved = results[QUESTIONS[0]]
    assert moved[-1][0] != victim  # the trajectory went on on the surviving replica
