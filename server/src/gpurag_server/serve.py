"""Run the server under uvicorn (uvloop, httptools), building the default corpus first if it is absent."""

from __future__ import annotations

import sys

from gpurag_server.settings import ServerSettings


def prepare_default_corpus(settings: ServerSettings) -> None:
    """Build the default corpus index now, with a progress bar, unless it is cached (or another corpus is named)."""
    if settings.workload != "rag" or settings.corpus is not None:
        return
    from tqdm import tqdm

    from gpurag.rag.default_corpus import default_chunks, is_cached, load_default_corpus
    from gpurag.rag.embedders import get_embedder

    embedder = get_embedder(settings.embedder)
    if is_cached(embedder):
        return
    print(f"building the default corpus index with {embedder.name} (once; it is cached)", file=sys.stderr)
    with tqdm(total=len(default_chunks()), desc="indexing", unit="chunk", file=sys.stderr) as bar:
        load_default_corpus(embedder, progress=bar.update)


def curl_example(settings: ServerSettings, port: int) -> str:
    auth = ' -H "Authorization: Bearer $KEY"' if settings.api_keys else ""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    return (
        f"curl -s http://{host}:{port}/v1/rag{auth} -H 'Content-Type: application/json' "
        '-d \'{"query": "What does the with statement do?", "k": 3}\''
    )


def serve(settings: ServerSettings) -> None:
    """Serve until interrupted."""
    import asyncio

    import uvicorn
    import uvloop

    from gpurag_server.app import create_app

    prepare_default_corpus(settings)
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="info",
    )
    server = uvicorn.Server(config)

    async def main() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            port = server.servers[0].sockets[0].getsockname()[1]
            print(
                f"gpurag serving on http://{settings.host}:{port}; try:\n  {curl_example(settings, port)}", flush=True
            )
        await task

    uvloop.run(main())
