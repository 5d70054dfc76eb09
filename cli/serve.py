"""`mixq serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over a (quantized) checkpoint.
A thin layer over mixtral_quant.serve: load, build the engine and the app, configure logging, run uvicorn."""

import ipaddress
import json
import logging
import time

import click

from .options import load, model_options


class JsonFormatter(logging.Formatter):
    """--json-logs: one JSON object a line; request lines carry their fields (id, tokens, tok/s, queue wait)."""

    def format(self, record):
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + "Z",
               "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}  # fmt: skip
        out.update(getattr(record, "request", None) or {})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command()
@click.argument("path")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; anything but loopback exposes the model to the network (set an API key).")  # fmt: skip
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--api-key", envvar="MIXQ_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on every request but /health (env MIXQ_API_KEY).")  # fmt: skip
@click.option("--model-name", default=None, help="The model id clients see in /v1/models (default: PATH as given).")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Requests decoded together in one batch.")  # fmt: skip
@click.option("--max-queue", type=click.IntRange(min=0), default=64, show_default=True,
              help="Requests waiting beyond a full batch; more get 503.")  # fmt: skip
@click.option("--context", type=click.IntRange(min=2), default=4096, show_default=True,
              help="Longest prompt + completion per request, in tokens (capped at the model's); sizes the KV cache.")  # fmt: skip
@click.option("--max-body", type=click.IntRange(min=1024), default=2 << 20, show_default=True,
              help="Largest request body, in bytes (larger: 413).")  # fmt: skip
@click.option("--json-logs", is_flag=True, help="Log one JSON object a line (request lines with their fields).")
@model_options(reserve=False)
def serve(path, host, port, api_key, model_name, max_batch, max_queue, context, max_body, json_logs, device, dtype,
          backend, max_memory):  # fmt: skip
    """Serve the model at PATH with the OpenAI API: /v1/chat/completions, /v1/completions, /v1/models, /health.

    Requests are decoded together (up to --max-batch rows; a request joins a running batch at its next step when a
    row is free, later ones queue up to --max-queue); point any OpenAI client
    at http://HOST:PORT/v1 (OPENAI_BASE_URL). Needs the serve extra: pip install 'mixtral-quant[serve]'.

    \b
    Examples:
      mixq serve mixtral-nf4
      MIXQ_API_KEY=secret mixq serve mixtral-nf4 --host 0.0.0.0 --port 8080 --model-name mixtral
      mixq serve builtin:tiny-mixtral --max-batch 16 --json-logs
    """
    try:
        import uvicorn

        from ..serve.app import create_app
        from ..serve.engine import Engine
    except ImportError as e:
        raise click.ClickException(f"{e.name} is missing: mixq serve needs pip install 'mixtral-quant[serve]'")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_logs else logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    for name in ("mixtral_quant.serve", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers, logger.propagate = [handler], False
        logger.setLevel(min(logging.INFO, logging.getLogger().level))  # -vv: the engine's debug lines too
    if not is_loopback(host) and not api_key:
        logging.getLogger("mixtral_quant.serve").warning(
            "serving on %s without an API key: anyone who can reach this port can use the model "
            "(set --api-key or MIXQ_API_KEY)", host)  # fmt: skip
    # --max-memory reserves the KV cache and workspace of --max-batch x --context tokens, then places the experts
    model, load_s = load(path, device, dtype, backend, max_memory, context=context, batch=max_batch)
    name = model_name or path  # as vLLM: the model argument, unless --model-name
    engine = Engine(model, max_batch=max_batch, max_queue=max_queue, context=context)
    logging.getLogger("mixtral_quant.serve").info(
        "loaded %s in %.1f s on %s; serving %r on http://%s:%d/v1 (batch %d, queue %d, context %d)",
        path, load_s, model.device, name, host, port, max_batch, max_queue, engine.context)  # fmt: skip
    app = create_app(engine, name, api_key=api_key, max_body=max_body)
    uvicorn.run(app, host=host, port=port, log_config=None, access_log=False)
