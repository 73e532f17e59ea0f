"""Build gateway clients from settings, by configured name."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx

from core.domain import Provider
from core.errors import GatewayNotSupported
from core.settings import GatewayConfig, Settings, get_settings
from gateways.base import Gateway
from gateways.evolution import EvolutionGateway
from gateways.megaapi import MegaApiGateway
from gateways.prometheus import MetricsAccess
from gateways.resilience import BreakerPolicy, RetryPolicy
from gateways.waha import WahaGateway


def build_gateway(
    name: str,
    config: GatewayConfig,
    *,
    settings: Settings | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Gateway:
    """A client for one configured gateway."""
    settings = settings or get_settings()
    timeout = httpx.Timeout(config.timeout_seconds, connect=config.connect_timeout_seconds)
    retry = RetryPolicy(
        attempts=settings.gateway_retry_attempts,
        initial_seconds=settings.gateway_retry_initial_seconds,
        max_seconds=settings.gateway_retry_max_seconds,
    )
    breaker = BreakerPolicy(
        failure_threshold=settings.gateway_breaker_failures,
        recovery_seconds=settings.gateway_breaker_recovery_seconds,
    )
    metrics = None
    if config.metrics:  # only for Evolution and WAHA (GatewayConfig checks)
        password = config.metrics_password.get_secret_value() if config.metrics_password else None
        metrics = MetricsAccess(user=config.metrics_user, password=password)
    return client_class(config.provider, name=name)(
        metrics=metrics,
        name=name,
        base_url=config.url,
        api_key=config.api_key.get_secret_value(),
        timeout=timeout,
        max_concurrency=config.max_concurrency,
        transport=transport,
        retry=retry,
        breaker=breaker,
    )


_CLIENTS: dict[Provider, type[EvolutionGateway] | type[MegaApiGateway] | type[WahaGateway]] = {
    Provider.EVOLUTION: EvolutionGateway,
    Provider.MEGAAPI: MegaApiGateway,
    Provider.WAHA: WahaGateway,
}


def client_class(
    provider: Provider, *, name: str = ""
) -> type[EvolutionGateway] | type[MegaApiGateway] | type[WahaGateway]:
    """The client class of ``provider``: what it can do is asked of it (``supports_history``, ``bulk_states``)."""
    try:
        return _CLIENTS[provider]
    except KeyError:
        raise GatewayNotSupported(f"gateway {name!r}: provider {provider} has no client yet", gateway=name) from None


def history_gateways(settings: Settings | None = None) -> list[str]:
    """Configured gateways whose client can read history (imports)."""
    configs = (settings or get_settings()).gateways()
    return [
        name
        for name, config in configs.items()
        if config.provider in _CLIENTS and _CLIENTS[config.provider].supports_history
    ]


@asynccontextmanager
async def open_gateways(names: set[str] | None = None) -> AsyncIterator[dict[str, Gateway]]:
    """Clients for the configured gateways (or just ``names``), closed on exit."""
    settings = get_settings()
    configs = settings.gateways()
    clients = {
        name: build_gateway(name, config, settings=settings)
        for name, config in configs.items()
        if names is None or name in names
    }
    try:
        yield clients
    finally:
        for client in clients.values():
            await client.aclose()
