"""`request-router --demo`: simulated backends on the configured ports, and what to try."""

from __future__ import annotations

from config.schema import Config
from simulator.cluster import Cluster, start_for_config


async def start_demo_backends(config: Config) -> Cluster:
    cluster = await start_for_config(config)
    for backend in cluster.backends.values():
        backend.behaviour.token_delay = 0.05  # visible token-by-token streaming
    return cluster


def print_instructions(config: Config) -> None:
    host = "127.0.0.1" if config.server.host in ("0.0.0.0", "::") else config.server.host
    base = f"http://{host}:{config.server.port}"
    print(
        f"""
request-router demo: simulated backends are up and the gateway is listening on {base}

  curl -s {base}/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "auto", "messages": [{{"role": "user", "content": "Hello"}}]}}' -i

  curl -sN {base}/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "hermes-2", "stream": true,
            "messages": [{{"role": "user", "content": "Hi"}}]}}'

  curl -s -X PUT {base}/api/v1/router/strategy -H 'Content-Type: application/json' \\
       -d '{{"strategy": "least_connections"}}'

  pip install openai   # once, for the SDK example below
  python - <<'PY'
  from openai import OpenAI
  client = OpenAI(base_url="{base}/v1", api_key="unused")
  for chunk in client.chat.completions.create(model="mixtral-8x7b", stream=True,
          messages=[{{"role": "user", "content": "Hello"}}]):
      print(chunk.choices[0].delta.content or "", end="", flush=True)
  print()
  PY

  bash scripts/test_routing.sh {base}

  dashboard:  {base}/dashboard        metrics:  {base}/metrics

Press Ctrl+C to stop.
""",
        flush=True,
    )
