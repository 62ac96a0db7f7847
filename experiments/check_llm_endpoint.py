"""Valid-reply rate of a real chat endpoint on the planner, menu-navigator and merge paths.

  # Ollama (a vision model, for the navigator's screenshots):
  python -m experiments.check_llm_endpoint --protocol=ollama \
      --base_url=http://127.0.0.1:11434 --model=llava:7b
  # an OpenAI-compatible server, key in the environment:
  OPENAI_API_KEY=... python -m experiments.check_llm_endpoint --protocol=openai \
      --base_url=https://host/v1 --model=<model> --api_key_env=OPENAI_API_KEY
  # the loopback reference server (replies written by rules, not a model):
  python -m experiments.check_llm_endpoint --base_url=reference

Sends `--requests` seeded prompts per path (`mbjax.runtime.endpoint_check`), one at a time,
and prints per path the valid replies (schema and the path's rules), their rate, the median
and largest latency, and the first failure reasons; `--out` also writes them as JSON. Exits
with an error when nothing reached the endpoint.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import json  # noqa: E402

from absl import app, flags, logging  # noqa: E402

from experiments import cli  # noqa: E402
from mbjax.runtime import endpoint_check, llm  # noqa: E402

_PROTOCOL = flags.DEFINE_enum("protocol", "ollama", list(llm.PROTOCOLS), "Chat protocol.")
_BASE_URL = flags.DEFINE_string("base_url", "http://127.0.0.1:11434", "Endpoint base URL "
                                "(openai: usually ending in /v1); 'reference': the loopback "
                                "reference server.")
_MODEL = flags.DEFINE_string("model", "llava:7b", "Model name.")
_API_KEY_ENV = flags.DEFINE_string("api_key_env", "", "Name of the env var holding the key.")
_TIMEOUT = flags.DEFINE_float("timeout_s", 60.0, "Socket timeout per request.", lower_bound=0.1)
_REQUESTS = flags.DEFINE_integer("requests", 10, "Prompts per path.", lower_bound=1)
_PATHS = flags.DEFINE_list("paths", list(endpoint_check.PATHS), "Paths to check.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic situations.")
_OUT = flags.DEFINE_string("out", None, "Optional JSON file for the report.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  unknown = sorted(set(_PATHS.value) - set(endpoint_check.PATHS))
  if unknown:
    raise app.UsageError(f"--paths: unknown {unknown}; expected some of "
                         f"{list(endpoint_check.PATHS)}")
  server, base_url = None, _BASE_URL.value
  if base_url == "reference":
    from mbjax.runtime.reference_llm_server import ReferenceLLMServer

    server = ReferenceLLMServer(endpoint_check.reference_responder).start()
    base_url = server.url
  try:
    try:
      backend = llm.BackendConfig(protocol=_PROTOCOL.value, base_url=base_url,
                                  model=_MODEL.value, timeout_s=_TIMEOUT.value,
                                  api_key_env=_API_KEY_ENV.value)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
    report = endpoint_check.check_endpoint(backend, _REQUESTS.value, _SEED.value,
                                           tuple(_PATHS.value), progress=logging.info)
  finally:
    if server is not None:
      server.stop()
  endpoint = ("the loopback reference server (rule replies, not a model)"
              if server is not None else f"{backend.endpoint} ({_MODEL.value})")
  print(endpoint_check.format_report(report, endpoint))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump({"endpoint": endpoint, "paths": report}, f, indent=2)
  if endpoint_check.unreachable(report):
    raise app.UsageError(f"nothing reached {backend.endpoint}: every request was refused "
                         "(is the server running, and the URL right?)")


if __name__ == "__main__":
  cli.run(main)
