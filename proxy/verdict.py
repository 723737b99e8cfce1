"""What happened to one exchange, as one verdict that every consumer reads.

Retry, the circuit breaker, passive health, load shedding and telemetry all decide from the
verdict; none of them looks at a status code or an exception type again. The classification
happens once, where the outcome is known: `of_status` for an upstream answer, the error class
(proxy.errors) for a transport failure or a refusal, the relay for a broken body or a client
that left.

Verdicts are plain ints (module constants, not instances): reading one costs nothing on the
request path, and `VERDICT_NAMES[v]` names it in reports.
"""

from __future__ import annotations

from typing import Final

Verdict = int

OK: Final = 0
"""The backend answered and the answer reached the client (2xx, 3xx)."""
CLIENT_ERROR: Final = 1
"""The request is wrong (4xx from the backend or from our validation): says nothing of health."""
THROTTLED: Final = 2
"""Not now: a 429, from the backend (it cools down, not a failure) or from our rate limits."""
RETRYABLE: Final = 3
"""The backend failed in a way another backend may fix: unreachable, silent before its answer,
or 502/503/504. Counts against the backend."""
BACKEND_FAILED: Final = 4
"""The backend failed and resending would not help or is not safe: another 5xx, or a body
that broke off after its headers. Counts against the backend."""
CLIENT_GONE: Final = 5
"""The client went away before its answer (nginx's 499): not our failure, nor the backend's."""
GATEWAY_REFUSED: Final = 6
"""We turned the request away to protect the gateway (load shed, queue full or timed out, no
backend able to serve)."""

VERDICT_NAMES: Final = (
    "ok",
    "client_error",
    "throttled",
    "retryable",
    "backend_failed",
    "client_gone",
    "gateway_refused",
)

# Answers that went well as far as the backend is concerned: the breaker and the outcome
# rings count them as successes (a 4xx is the client's doing).
SUCCESSES: Final = frozenset({OK, CLIENT_ERROR})
# Verdicts that mean the backend is failing: the breaker, the failure counters and the outcome
# rings count these, and active health probes fail on them.
BACKEND_FAULTS: Final = frozenset({RETRYABLE, BACKEND_FAILED})
# Verdicts another backend might turn into a success (retry.py decides whether to try).
WORTH_ANOTHER_TRY: Final = frozenset({THROTTLED, RETRYABLE})
# What the client saw as a server-side failure.
SERVER_FAULTS: Final = frozenset({RETRYABLE, BACKEND_FAILED, GATEWAY_REFUSED})
# Admission control (admission.shedding) counts only answers from backends: these succeeded,
# these are signs the backends cannot keep up. The gateway's own refusals and clients that left
# are neither.
ADMISSION_SUCCESSES: Final = SUCCESSES
ADMISSION_FAILURES: Final = frozenset({THROTTLED, RETRYABLE, BACKEND_FAILED})


def _status_table() -> tuple[Verdict, ...]:
    table = [BACKEND_FAILED] * 100 + [OK] * 500  # below 100 is no HTTP status at all
    for status in range(400, 500):
        table[status] = CLIENT_ERROR
    for status in range(500, 600):
        table[status] = BACKEND_FAILED
    table[429] = THROTTLED
    for status in (502, 503, 504):  # "not here, not now": a gateway or a busy server
        table[status] = RETRYABLE
    return tuple(table)


_BY_STATUS: Final = _status_table()


def of_status(status: int) -> Verdict:
    """The verdict of an upstream answer with this status (one tuple index)."""
    return _BY_STATUS[status] if 0 <= status < 600 else BACKEND_FAILED


def fails_backend(status: int) -> bool:
    """Whether an answer with this status counts against the backend (for health probes)."""
    return of_status(status) in BACKEND_FAULTS
