"""The ``ray`` provider: each compute node a Ray actor holding one pipeline replica.

The head node keeps the queue, batcher, dispatcher, ledger and autoscaler; this provider only
starts, calls, drains and stops actors. It joins the cluster at ``GPURAG_RAY_ADDRESS`` or, without
one, starts a local Ray instance of its own (its own temp dir, no dashboard). Each actor asks for
``GPURAG_RAY_NUM_CPUS`` / ``GPURAG_RAY_NUM_GPUS``. Ray does not restart actors or retry their
calls: an actor that dies fails its batches with `NodeDiedError`, the batcher re-queues them once and
the pool starts a replacement, as for a dead process node.

The corpus index reaches the actors through Ray's object store by default: the head node loads
it once (building the default corpus if it is not cached) and puts it; actors on the head's host
map its arrays without a copy, actors elsewhere get it from Ray. ``GPURAG_RAY_CORPUS_TRANSFER=path``
makes every actor load the index from ``corpus`` instead (storage shared by every host).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from gpurag_server.nodes.base import BatchFailedError, Node, NodeDiedError, NodeProvider, NodeState, TextSink
from gpurag_server.settings import ServerSettings
from gpurag_server.workload import Outcome, WorkItem, WorkloadInfo

log = logging.getLogger("gpurag_server")

#: Concurrency group of the actors' health checks, so they are answered while a batch runs.
CONTROL_GROUP = "control"


class RaySettings(BaseSettings):
    """How the ``ray`` provider reaches Ray and what each actor asks for (``GPURAG_RAY_`` variables)."""

    model_config = SettingsConfigDict(env_prefix="GPURAG_RAY_", extra="ignore")

    address: str | None = Field(
        default=None, description="Cluster to join ('auto', 'host:6379', 'ray://host:10001'); None: start a local one."
    )
    namespace: str = Field(default="gpurag", description="Ray namespace of the actors.")
    num_cpus: float = Field(default=1.0, ge=0, description="CPUs each node actor reserves.")
    num_gpus: float | None = Field(
        default=None, ge=0, description="GPUs each node actor reserves; None: 1 if the cluster has GPUs, else 0."
    )
    corpus_transfer: Literal["object_store", "path"] = Field(
        default="object_store", description="How actors get the corpus index: Ray's object store or the shared path."
    )
    local_num_cpus: int = Field(default=2, gt=0, description="CPUs of a local Ray instance.")
    local_object_store_bytes: int | None = Field(
        default=None, gt=0, description="Object store of a local Ray instance; None: Ray's default."
    )
    local_temp_dir: Path | None = Field(
        default=None, description="Temp dir of a local Ray instance; None: a fresh one under the system temp dir."
    )


def ray_errors() -> tuple[type[BaseException], type[BaseException]]:
    """(actor died, task raised): Ray's exception classes, imported on use."""
    from ray.exceptions import RayActorError, RayTaskError

    return RayActorError, RayTaskError


class RayNode(Node):
    """One actor handle; ``pid`` and ``host`` are the actor's worker process once it is ready."""

    def __init__(self, name: str) -> None:
        super().__init__(name, "ray")
        self.actor: Any = None
        self.pid: int | None = None
        self.host: str | None = None
        self.death: str | None = None
        self.pending: set[asyncio.Future[list[Outcome]]] = set()
        self.watcher: asyncio.Task[None] | None = None

    async def run(self, items: Sequence[WorkItem], on_text: TextSink | None = None) -> list[Outcome]:
        """The actor's outcomes; ``on_text`` is not called (an actor call returns once): a streaming
        request gets its whole answer at the end."""
        del on_text
        if self.death is not None or self.actor is None:
            raise NodeDiedError(self.death or f"node {self.name} has no actor")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Outcome]] = loop.create_future()
        self.pending.add(future)
        ref = self.actor.run.remote(list(items))
        ref.future().add_done_callback(lambda done: loop.call_soon_threadsafe(self._settle, future, done))
        try:
            return await future
        finally:
            self.pending.discard(future)

    def _settle(self, future: asyncio.Future[list[Outcome]], done: Any) -> None:
        if future.done():
            return
        actor_died, task_raised = ray_errors()
        error = done.exception()
        if error is None:
            future.set_result(done.result())
        elif isinstance(error, task_raised):
            cause = getattr(error, "cause", error)
            future.set_exception(BatchFailedError(f"{type(cause).__name__}: {cause}"))
        elif isinstance(error, actor_died):
            self.die(f"actor died ({type(error).__name__})")
        else:  # a Ray system error: the batch's fate is unknown, so treat the node as gone
            self.die(f"{type(error).__name__}: {error}")
        if not future.done():
            future.set_exception(NodeDiedError(self.death or "node died"))

    def die(self, reason: str) -> None:
        """Fail every pending batch with `NodeDiedError` and tell the pool (which stops the actor)."""
        if self.death is not None:
            return
        self.death = f"node {self.name} (pid {self.pid}): {reason}"
        for future in self.pending:
            if not future.done():
                future.set_exception(NodeDiedError(self.death))
        if self.on_death is not None and self.state is not NodeState.STARTING:
            self.on_death(self, self.death)

    async def watch(self, interval_s: float, timeout_s: float) -> None:
        """Ping the actor (its ``control`` group answers while a batch runs); dead when it fails or is silent."""
        actor_died, _ = ray_errors()
        while self.death is None:
            await asyncio.sleep(interval_s)
            if self.death is not None or self.actor is None:
                return
            try:
                ref = self.actor.ping.options(concurrency_group=CONTROL_GROUP).remote()
                await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout_s)
            except TimeoutError:
                self.die(f"no answer to a ping for {timeout_s} s")
            except actor_died as exc:
                self.die(f"actor died ({type(exc).__name__})")
            except Exception as exc:
                self.die(f"ping failed: {type(exc).__name__}: {exc}")


class RayProvider(NodeProvider):
    """Ray actors, on a cluster joined at ``GPURAG_RAY_ADDRESS`` or on a local Ray started on demand."""

    name = "ray"

    def __init__(self, settings: ServerSettings, ray_settings: RaySettings | None = None) -> None:
        super().__init__(settings)
        self.ray_settings = ray_settings or RaySettings()
        self._lock = asyncio.Lock()
        self._actor_class: Any = None
        self._corpus_ref: Any = None
        self._started_ray = False
        self._own_temp_dir: Path | None = None
        self._num_gpus = 0.0
        #: Seconds the head spent loading the corpus and putting it in the object store.
        self.corpus_load_s: float | None = None
        self.corpus_put_s: float | None = None

    def create(self) -> Node:
        return RayNode(self.next_name())

    async def _prepare(self) -> None:
        """Connect to Ray (starting it if needed), make the actor class, put the corpus: once."""
        async with self._lock:
            if self._actor_class is not None:
                return
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, self._connect)
            import ray

            from gpurag_server.nodes.ray_actor import NodeActor

            self._actor_class = ray.remote(concurrency_groups={CONTROL_GROUP: 1})(NodeActor)  # type: ignore[call-overload]
            if self.settings.workload == "rag" and self.ray_settings.corpus_transfer == "object_store":
                self._corpus_ref = await loop.run_in_executor(None, self._put_corpus)

    def _connect(self) -> None:
        import ray

        rs = self.ray_settings
        if not ray.is_initialized():
            if rs.address is not None:
                ray.init(address=rs.address, namespace=rs.namespace, log_to_driver=False)
            else:
                if rs.local_temp_dir is None:
                    self._own_temp_dir = Path(tempfile.mkdtemp(prefix="gpurag-ray-"))
                temp_dir = rs.local_temp_dir or self._own_temp_dir
                ray.init(
                    num_cpus=rs.local_num_cpus,
                    object_store_memory=rs.local_object_store_bytes,
                    include_dashboard=False,
                    namespace=rs.namespace,
                    log_to_driver=False,
                    _temp_dir=str(temp_dir),
                )
            self._started_ray = True
        gpus = float(ray.cluster_resources().get("GPU", 0.0))  # type: ignore[no-untyped-call]
        self._num_gpus = rs.num_gpus if rs.num_gpus is not None else (1.0 if gpus > 0 else 0.0)

    def _put_corpus(self) -> Any:
        import ray

        from gpurag.rag.corpus import CorpusIndex
        from gpurag.rag.embedders import get_embedder
        from gpurag_server.nodes.ray_actor import CorpusPayload

        started = time.perf_counter()
        settings = self.settings
        if settings.corpus is not None:
            corpus = CorpusIndex.load(settings.corpus, backend=settings.search_backend)
        else:
            from gpurag.rag.default_corpus import load_default_corpus

            corpus = load_default_corpus(get_embedder(settings.embedder))
        loaded = time.perf_counter()
        ref = ray.put(CorpusPayload.of(corpus))
        self.corpus_load_s, self.corpus_put_s = loaded - started, time.perf_counter() - loaded
        log.info("corpus loaded in %.2f s, put in Ray's object store in %.2f s", self.corpus_load_s, self.corpus_put_s)
        return ref

    async def start(self, node: Node) -> WorkloadInfo:
        assert isinstance(node, RayNode)
        await self._prepare()
        rs = self.ray_settings
        try:
            node.actor = self._actor_class.options(
                name=f"gpurag-{node.name}-{secrets.token_hex(4)}",
                num_cpus=rs.num_cpus,
                num_gpus=self._num_gpus,
                max_restarts=0,
                max_task_retries=0,
            ).remote(self.settings.model_dump_json(), self._corpus_ref)
            ref = node.actor.ready.remote()
            info, node.pid, node.host = await asyncio.wrap_future(ref.future())
        except Exception as exc:
            node.death = f"node {node.name} failed to start: {_cause(exc)}"
            await self._kill(node)
            raise RuntimeError(node.death) from None
        node.watcher = asyncio.create_task(
            node.watch(self.settings.heartbeat_interval_s, self.settings.heartbeat_timeout_s), name=f"watch {node.name}"
        )
        assert isinstance(info, WorkloadInfo)
        return info

    async def stop(self, node: Node) -> None:
        assert isinstance(node, RayNode)
        node.death = node.death or "stopped"
        if node.watcher is not None:
            node.watcher.cancel()
        await self._kill(node)
        if node.state is not NodeState.DEAD:
            node.state = NodeState.STOPPED

    async def _kill(self, node: RayNode) -> None:
        if node.actor is None:
            return
        import ray

        actor, node.actor = node.actor, None
        with contextlib.suppress(Exception):
            await asyncio.get_running_loop().run_in_executor(None, lambda: ray.kill(actor, no_restart=True))

    async def close(self) -> None:
        self._corpus_ref = None
        if self._started_ray:
            import ray

            await asyncio.get_running_loop().run_in_executor(None, ray.shutdown)
            self._started_ray = False
            if self._own_temp_dir is not None:
                shutil.rmtree(self._own_temp_dir, ignore_errors=True)
        self._actor_class = None


def _cause(exc: BaseException) -> str:
    """The innermost reason Ray gives for a failed actor creation."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
