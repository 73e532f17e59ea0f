"""Demo mode: the simulated gateways keep changing, and the changes reach zapsync as webhooks."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from gateways.simulator.emitter import WebhookEmitter
from gateways.simulator.state import SimulatorState

logger = logging.getLogger(__name__)


async def run_demo(
    state: SimulatorState,
    emitter: WebhookEmitter | None,
    *,
    interval_s: float = 5.0,
    stop: asyncio.Event,
) -> int:
    """Call ``state.tick()`` every ``interval_s`` until ``stop`` is set; returns the number of ticks.

    The emitter delivers the changes (it is started here, and closed at the end, if it was not running); each tick
    waits for its deliveries, so a slow receiver slows the demo down instead of piling up requests.
    """
    if state.config.flap_rate <= 0:
        logger.warning("simulator demo: flap_rate is 0, nothing will change")
    owns_emitter = emitter is not None and not emitter.started
    if emitter is not None and owns_emitter:
        await emitter.start()
    ticks = 0
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval_s)
            if stop.is_set():
                break
            changes = state.tick()
            ticks += 1
            logger.debug("simulator demo tick %d: %d changes", ticks, len(changes))
            if emitter is not None:
                await emitter.flush()
    finally:
        if emitter is not None and owns_emitter:
            await emitter.aclose()
    return ticks
