"""`moequant serve`: mlx-lm's OpenAI-compatible HTTP server (same flags) with the fused
MoE decode path, also under distributed (sharded/pipelined) loading; --no-fused for
comparison.

On top of mlx-lm's server (whose classes it reuses) it:
* serves exactly the model given by --model (checked before starting): a request naming
  another model, draft model or adapter gets 400 instead of a download or a reload;
* validates every request before it reaches the generation thread, where a bad value
  (a logit_bias id past the vocabulary, top_k >= the vocabulary, NaN temperature, ...)
  would crash the process or kill the thread: 400 with a JSON error instead;
* listens with a full-size backlog (http.server's default of 5 reset connections under
  a few dozen concurrent clients);
* lists the served model on GET /v1/models without reading the Hugging Face cache;
* exits (code 1, or 2 when the model cannot be loaded) when the generation thread dies,
  instead of answering every request with "generation thread died".
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import socket
import sys
import threading
import warnings
from pathlib import Path

# mlx-lm's integer request fields and the float ones (the latter accept ints, as JSON
# has one number type; bools are neither).
_INT_FIELDS = (
    "max_tokens",
    "top_k",
    "num_draft_tokens",
    "repetition_context_size",
    "presence_context_size",
    "frequency_context_size",
    "top_logprobs",
    "seed",
)
_FLOAT_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "xtc_probability",
    "xtc_threshold",
)
# Bounds the generation code relies on (token counts and context sizes index Python
# lists and mx arrays; the seed goes to mx.random.seed, a uint64).
_INT_MAX = {
    "max_tokens": 2**31 - 1,
    "repetition_context_size": 2**31 - 1,
    "presence_context_size": 2**31 - 1,
    "frequency_context_size": 2**31 - 1,
    "num_draft_tokens": 64,
    "seed": 2**64 - 1,
}


def add_arguments(p) -> None:
    module = importlib.import_module("mlx_lm.server")

    from .mlx_lm_cli import add_mlx_lm_arguments

    add_mlx_lm_arguments(p, module.main)


class GenerationDied(Exception):
    """The generation thread ended with an error: the server stops (exit code 1)."""


def _vocab_size(config: dict):
    for c in (config, config.get("text_config") or {}):
        v = c.get("vocab_size") if isinstance(c, dict) else None
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _classes(server, served_id: str, model_arg: str, vocab):
    """The handler, server and response-generator classes, derived from mlx-lm's."""
    base = server.APIHandler
    accepted = {"default_model", model_arg, served_id}

    class Handler(base):
        def validate_model_parameters(self) -> None:
            super().validate_model_parameters()  # mlx-lm's type and range checks
            for name in _INT_FIELDS + _FLOAT_FIELDS:
                v = getattr(self, name, None)
                if isinstance(v, bool):
                    raise ValueError(f"{name} must be a number, not a boolean")
                if isinstance(v, float) and not math.isfinite(v):
                    raise ValueError(f"{name} must be finite; got {v}")
                if isinstance(v, int) and name in _INT_MAX and v > _INT_MAX[name]:
                    raise ValueError(f"{name} must be at most {_INT_MAX[name]}; got {v}")
            if isinstance(self.seed, int) and self.seed < 0:
                raise ValueError("seed must be non-negative")
            if not isinstance(self.requested_draft_model, (str, type(None))):
                raise ValueError("draft_model must be a string")
            if self.requested_model not in accepted:
                raise ValueError(
                    f"model {self.requested_model!r} is not served here; this server serves "
                    f"{served_id!r} (GET /v1/models); omit 'model' or use that id"
                )
            if self.requested_draft_model not in ("default_model", None) or self.adapter is not None:
                raise ValueError("this server does not load draft models or adapters per request")
            if vocab is not None and self.top_k >= vocab:
                raise ValueError(f"top_k must be less than the vocabulary size {vocab}; got {self.top_k}")
            if self.logit_bias:
                if vocab is None:
                    raise ValueError(
                        "logit_bias is not supported: the model's config.json gives no vocab_size"
                    )
                for tok, bias in self.logit_bias.items():
                    if not 0 <= tok < vocab:
                        raise ValueError(f"logit_bias token id {tok} is outside the vocabulary [0, {vocab})")
                    if not math.isfinite(bias):
                        raise ValueError(f"logit_bias value for token {tok} must be finite; got {bias}")
            msgs = self.body.get("messages")
            if msgs is not None and not (isinstance(msgs, list) and all(isinstance(m, dict) for m in msgs)):
                raise ValueError("messages must be a list of objects")
            stop = self.body.get("stop")
            if stop is not None and not (
                isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
            ):
                raise ValueError("stop must be a string or a list of strings")
            if "prompt" in self.body and not isinstance(self.body["prompt"], str):
                raise ValueError("prompt must be a string")

        def handle_models_request(self):
            # Only the served model: requests for any other are refused above, and
            # mlx-lm's listing of the Hugging Face cache fails (empty body) without one.
            parts = self.path.split("?")[0].rstrip("/").split("/")
            wanted = "/".join(parts[3:]) or None
            data = [{"id": served_id, "object": "model", "created": self.created}]
            if wanted is not None and wanted.strip("/") != served_id.strip("/"):
                data = []
            self._set_completion_headers(200)
            self.end_headers()
            self.wfile.write(json.dumps({"object": "list", "data": data}).encode())
            self.wfile.flush()

    class Server(server.ThreadingHTTPServer):
        # http.server listens with a backlog of 5: beyond that many connections waiting
        # for accept(), the kernel drops or resets them (3-10% of 20 concurrent clients
        # were reset). The kernel caps this at net.core.somaxconn.
        request_queue_size = socket.SOMAXCONN

    class Generator(server.ResponseGenerator):
        error = None

        def _run_generate(self):
            try:
                self._generate()
            except Exception as e:  # recorded for the main thread, which exits
                self.error = e
                if not isinstance(e, _LoadError):
                    logging.exception(f"moequant serve: generation thread died: {e}")
                self._generation_failed = True

    return Handler, Server, Generator


class _LoadError(Exception):
    pass


def _serve(server, host, port, model_provider, served_id, model_arg, vocab):
    """mlx_lm.server.run with our classes; returns when the generation thread ends."""
    import mlx.core as mx

    Handler, Server, Generator = _classes(server, served_id, model_arg, vocab)
    group = mx.distributed.init()
    generator = Generator(model_provider, server.LRUPromptCache(model_provider.cli_args.prompt_cache_size))
    httpd = None
    try:
        if group.rank() == 0:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, _, _, _, address = infos[0]
            Server.address_family = family
            fingerprint = server.get_system_fingerprint()
            httpd = Server(
                address, lambda *a, **k: Handler(generator, *a, system_fingerprint=fingerprint, **k)
            )
            warnings.warn(
                "mlx_lm.server is not recommended for production as it only implements basic security checks."
            )
            logging.info(f"Starting httpd at {host} on port {port}...")
            threading.Thread(target=httpd.serve_forever, daemon=True).start()
        # The main thread waits on the generation thread (with a timeout, so that
        # Ctrl-C is seen): when it ends, so does the server.
        while generator._generation_thread.is_alive():
            generator._generation_thread.join(0.5)
    except KeyboardInterrupt:
        generator.stop_and_join()
    finally:
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
    if isinstance(generator.error, _LoadError):
        from .errors import UserError

        raise UserError(str(generator.error))
    if generator.error is not None:
        raise GenerationDied(
            f"the generation thread died ({type(generator.error).__name__}: "
            f"{generator.error}); the server stopped"
        )


def run(args) -> int:
    module = importlib.import_module("mlx_lm.server")

    from . import distributed
    from .mlx_lm_cli import check_model_dir, run_mlx_lm_main

    group = distributed.world()
    facts, error, config = {}, None, None
    try:
        config = check_model_dir(args.model)
        if group.size() > 1:
            facts = {
                "model (config.json and weight index)": distributed.model_identity(args.model),
                "--pipeline": bool(getattr(args, "pipeline", False)),
            }
    except Exception as e:  # under mlx.launch a local failure must reach every rank
        error = e
    distributed.agree(group, facts, error, "moequant serve")
    served_id = str(Path(args.model).resolve())

    def run_server(host, port, model_provider, *a, **k):
        _serve(module, host, port, model_provider, served_id, args.model, _vocab_size(config))

    def load_error(e, path):
        return _LoadError(f"--model {path}: cannot load the model: {type(e).__name__}: {e}")

    saved_run = module.run
    module.run = run_server
    try:
        return run_mlx_lm_main(module, args, loaders=("load", "sharded_load"), load_error=load_error)
    except GenerationDied as e:
        print(f"moequant serve: error: {e}", file=sys.stderr)
        return 1
    finally:
        module.run = saved_run
