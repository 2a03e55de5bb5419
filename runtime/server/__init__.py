"""phi3v_edge.runtime.server: the OpenAI-compatible HTTP server over the batching Engine (`phi3v-edge serve`).

    protocol.py  request body -> Engine.submit arguments; response, chunk and error shapes (plain Python)
    images.py    data URLs and (with --allow-image-urls) http(s) fetches -> image bytes (standard library)
    metrics.py   Prometheus metrics (prometheus-client)
    app.py       the Starlette app: routes, streaming, errors, cancellation, timeouts
    cli.py       the `serve` subcommand: options, socket, uvicorn, SIGTERM drain

Needs the extra: pip install 'phi3v-edge[serve]'. Importing this package imports none of it.
"""
