"""GET /routing/cost-analysis: spend per model and per day from the accounting database,
budget used and remaining, and what a cheaper eligible model would have saved."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from circuit.breaker import iso_utc
from config.schema import ModelConfig
from control.admin import json_response, now_iso
from proxy.errors import AccountingDisabled
from proxy.runtime import LiveRuntime
from telemetry.outcome import price


def cheapest_eligible(model: ModelConfig, models: list[ModelConfig]) -> ModelConfig | None:
    """The cheapest other model that can do everything this one is configured to do."""
    needed = set(model.capabilities)
    candidates = [
        m
        for m in models
        if m.name != model.name
        and needed <= set(m.capabilities)
        and m.cost_per_request < model.cost_per_request
    ]
    return min(candidates, key=lambda m: m.cost_per_request, default=None)


class CostAnalysis:
    def __init__(self, live: LiveRuntime) -> None:
        self.live = live

    async def report(self, request: web.Request) -> web.Response:
        accountant = self.live.runtime.accountant
        if accountant is None:
            raise AccountingDisabled("request accounting is off (accounting.enabled: false)")
        await accountant.flush()  # include what is still buffered
        rows = await accountant.store.spend_by_model_day()
        config = self.live.runtime.config
        models = {m.name: m for m in config.models}
        by_model: dict[str, dict[str, Any]] = {}
        by_day: dict[str, dict[str, Any]] = {}
        for model, day, requests, cost, prompt, completion in rows:
            entry = by_model.setdefault(
                model,
                {"requests": 0, "cost": 0.0, "prompt_tokens": 0, "completion_tokens": 0},
            )
            entry["requests"] += requests
            entry["cost"] += cost
            entry["prompt_tokens"] += prompt
            entry["completion_tokens"] += completion
            daily = by_day.setdefault(day, {"requests": 0, "cost": 0.0, "by_model": {}})
            daily["requests"] += requests
            daily["cost"] += cost
            daily["by_model"][model] = round(cost, 6)
        recommendations = []
        for name, entry in by_model.items():
            entry["avg_cost_per_request"] = round(entry["cost"] / entry["requests"], 6)
            entry["cost"] = round(entry["cost"], 6)
            configured = models.get(name)
            cheaper = cheapest_eligible(configured, list(models.values())) if configured else None
            if cheaper is None:
                continue
            would_cost = price(
                cheaper, entry["requests"], entry["prompt_tokens"], entry["completion_tokens"]
            )
            recommendations.append(
                {
                    "model": name,
                    "cheaper_model": cheaper.name,
                    "requests": entry["requests"],
                    "current_cost": entry["cost"],
                    "cost_with_cheaper_model": round(would_cost, 6),
                    "potential_saving": round(entry["cost"] - would_cost, 6),
                }
            )
        recommendations.sort(key=lambda r: r["potential_saving"], reverse=True)
        for daily in by_day.values():
            daily["cost"] = round(daily["cost"], 6)
        # The budget counts its period (budget.period), live: every worker's and host's spend,
        # what is still buffered included; the tables below are the accounting's lifetime.
        runtime = self.live.runtime
        used = runtime.spent()
        limit = config.budget.limit
        period = runtime.spend_period
        return json_response(
            {
                "budget": {
                    "limit": limit,
                    "period": config.budget.period,
                    "period_start": iso_utc(period.start) if period.key else None,
                    "used": round(used, 6),
                    "remaining": round(max(0.0, limit - used), 6),
                    "used_percentage": round(used / limit * 100, 4) if limit else None,
                },
                "spend_by_model": by_model,
                "spend_by_day": by_day,
                "recommendations": recommendations,
                "total_potential_saving": round(
                    sum(r["potential_saving"] for r in recommendations), 6
                ),
                "accounting": accountant.state(),
                "timestamp": now_iso(),
            }
        )

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/routing/cost-analysis", self.report)]
