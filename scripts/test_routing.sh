#!/usr/bin/env bash
# Walk through a running gateway: which backend answers, strategy switches, health.
# Usage: scripts/test_routing.sh [BASE_URL]   (default http://127.0.0.1:8000)
# Exits non-zero at the first step that fails.
set -euo pipefail

BASE="${1:-${ROUTER_URL:-http://127.0.0.1:8000}}"
AUTH=()
if [[ -n "${ROUTER_ADMIN_TOKEN:-}" ]]; then
  AUTH=(-H "Authorization: Bearer ${ROUTER_ADMIN_TOKEN}")
fi
CHAT='{"model": "auto", "messages": [{"role": "user", "content": "Hello"}]}'

fail() { echo "FAIL: $*" >&2; exit 1; }
step() { printf '\n== %s\n' "$*"; }

# POST a chat completion; print "status backend".
ask() {
  curl -s -o /dev/null -D - -X POST "$BASE/v1/chat/completions" \
       -H 'Content-Type: application/json' -d "${1:-$CHAT}" \
    | awk 'NR==1 {status=$2} tolower($1)=="x-router-backend:" {gsub("\r",""); backend=$2}
           END {print status, backend}'
}

ten_requests() {
  local i line
  for i in $(seq 1 10); do
    line=$(ask)
    [[ "${line%% *}" == "200" ]] || fail "request $i answered '$line'"
    printf '  request %2d -> %s\n' "$i" "${line#* }"
  done
}

set_strategy() {
  local body
  body=$(curl -s -X PUT "$BASE/api/v1/router/strategy" "${AUTH[@]}" \
              -H 'Content-Type: application/json' -d "{\"strategy\": \"$1\"}")
  echo "$body" | jq -e ".strategy_change.new_strategy == \"$1\"" >/dev/null \
    || fail "strategy switch to $1: $body"
  echo "  $(echo "$body" | jq -c '.strategy_change | {previous_strategy, new_strategy}')"
}

step "health ($BASE/health)"
curl -sf "$BASE/health" | jq -c '{status, models, strategy}' || fail "gateway not healthy"

step "models"
curl -sf "$BASE/v1/models" | jq -r '.data[].id' | sed 's/^/  /' || fail "model list"

step "current strategy"
ORIGINAL=$(curl -sf "$BASE/api/v1/router/strategy" | jq -r .strategy) || fail "strategy read"
echo "  $ORIGINAL"

for strategy in round_robin weighted least_connections; do
  step "strategy $strategy: ten requests"
  set_strategy "$strategy"
  ten_requests
done

step "streaming"
stream=$(curl -sN -X POST "$BASE/v1/chat/completions" -H 'Content-Type: application/json' \
     -d '{"model": "hermes-2", "stream": true, "messages": [{"role": "user", "content": "Hi"}]}')
events=$(grep -c '^data: ' <<<"$stream" || true)
grep -q '^data: \[DONE\]' <<<"$stream" || fail "stream did not finish with [DONE]"
echo "  $events SSE events, ending with [DONE]"

step "unknown model -> 404"
line=$(ask '{"model": "no-such-model", "messages": []}')
[[ "${line%% *}" == "404" ]] || fail "expected 404, got '$line'"
echo "  ok"

step "unknown strategy -> 400"
code=$(curl -s -o /dev/null -w '%{http_code}' -X PUT "$BASE/api/v1/router/strategy" "${AUTH[@]}" \
            -H 'Content-Type: application/json' -d '{"strategy": "telepathy"}')
[[ "$code" == "400" ]] || fail "expected 400, got $code"
echo "  ok"

step "vector search"
curl -sf -X POST "$BASE/api/v1/vectors/search" -H 'Content-Type: application/json' \
     -d '{"query_vector": [0.1, 0.2], "collection": "documents", "limit": 2}' \
  | jq -e '.result | length == 2' >/dev/null || fail "vector search"
echo "  ok"

# POST an admin chaos endpoint; prints the body, or returns 3 when chaos is disabled.
chaos() {
  local out code
  out=$(curl -s -w '\n%{http_code}' -X POST "$BASE/api/v1/router/$1" "${AUTH[@]}" \
             -H 'Content-Type: application/json' -d "$2")
  code=${out##*$'\n'}
  out=${out%$'\n'*}
  if [[ "$code" == "403" ]] && grep -q chaos_disabled <<<"$out"; then return 3; fi
  [[ "$code" == "200" ]] || fail "$1 answered $code: $out"
  echo "$out"
}

VICTIM=$(curl -sf "$BASE/api/v1/router/backends" | jq -r '[.[]][0][0].name') || fail "backends"

step "circuit breaker: trip $VICTIM's breaker, traffic avoids it"
set_strategy round_robin
if result=$(chaos circuit-breaker/test "{\"backend\": \"$VICTIM\", \"simulate_failure\": true}"); then
  echo "  $(jq -c '.circuit_breaker_test | {initial_state, simulated_failures, new_state, backup_backend}' <<<"$result")"
  jq -e '.circuit_breaker_test.new_state == "open"' <<<"$result" >/dev/null || fail "breaker did not open"
  for i in 1 2 3 4 5; do
    line=$(ask)
    [[ "${line%% *}" == "200" && "${line#* }" != "$VICTIM" ]] || fail "request $i answered '$line'"
    printf '  request %d -> %s\n' "$i" "${line#* }"
  done
  chaos circuit-breaker/test "{\"backend\": \"$VICTIM\", \"simulate_failure\": false}" >/dev/null
  echo "  breaker closed again"
else
  [[ $? -eq 3 ]] || exit 1
  echo "  skipped: chaos.enabled is false (the --demo turns it on)"
fi

step "failover: $VICTIM fails during a burst of 20 requests"
if result=$(chaos failover/test "{\"primary_backend\": \"$VICTIM\", \"simulate_failure\": true, \"requests\": 20}"); then
  echo "  $(jq -c '.failover_test | {backup_backend, failover_time_ms, requests_during_failover, requests_lost, recovery_successful}' <<<"$result")"
  jq -e '.failover_test.requests_lost == 0 and .failover_test.recovery_successful' <<<"$result" >/dev/null \
    || fail "requests were lost during failover"
else
  [[ $? -eq 3 ]] || exit 1
  echo "  skipped: chaos.enabled is false (the --demo turns it on)"
fi

step "admission and resilience state"
curl -sf "$BASE/api/v1/router/state" \
  | jq -c '{admission: .admission | {in_flight, queued, queue_size}, counters, should_shed_load}' \
  | sed 's/^/  /' || fail "state"

step "router health"
curl -sf "$BASE/api/v1/router/health" \
  | jq -r '"  overall \(.overall_health): \(.healthy_backends)/\(.total_backends) healthy",
           (.health_status | to_entries[] | .value | to_entries[]
            | "  \(.key): \(.value.status), check \(.value.response_time_ms // "-") ms")' \
  || fail "router health"

step "routing metrics"
curl -sf "$BASE/api/v1/router/metrics" \
  | jq -c '.routing_metrics | {total_requests, success_rate, requests_per_second,
           avg_response_time_ms, p99_response_time_ms, avg_gateway_overhead_ms}' \
  | sed 's/^/  /' || fail "routing metrics"
curl -sf "$BASE/api/v1/router/metrics" \
  | jq -r '.load_balancing.backend_distribution | to_entries[]
           | "  \(.key): \(.value.requests) requests (\(.value.percentage)%)"' \
  || fail "distribution"

step "model status"
curl -sf "$BASE/models/status" \
  | jq -r '.models | to_entries[]
           | "  \(.key): health \(.value.health_score), p95 \(.value.p95_latency) ms, circuit_open=\(.value.circuit_open)"' \
  || fail "model status"

step "Prometheus /metrics"
if metrics=$(curl -sf "$BASE/metrics"); then
  echo "  $(grep -c '^router_' <<<"$metrics") samples, e.g.:"
  grep -E '^router_(requests_total|in_flight|breaker_state)' <<<"$metrics" | head -n 4 | sed 's/^/    /'
else
  echo "  not exposed (metrics.enabled is false)"
fi

step "cost analysis"
if costs=$(curl -sf "$BASE/routing/cost-analysis"); then
  jq -c '.budget' <<<"$costs" | sed 's/^/  budget /'
  jq -r '.recommendations[]? | "  \(.model) -> \(.cheaper_model) would save \(.potential_saving)"' <<<"$costs"
else
  echo "  accounting is off"
fi

step "backend state"
curl -sf "$BASE/api/v1/router/backends" \
  | jq -r 'to_entries[] | .value[] | "  \(.name): requests=\(.requests) active=\(.active) healthy=\(.healthy) circuit=\(.circuit)"' \
  || fail "backend state"

step "restore strategy $ORIGINAL"
set_strategy "$ORIGINAL"
printf '\nall steps passed\n'
