"""The gateway simulator: Evolution API v2 and MegaAPI HTTP contracts over in-memory state.

A product feature (demo mode, benchmarks) and the fake of the outside world in tests. See ``state`` for the
semantics (live state vs Evolution's lagging ``connectionStatus`` column), ``history`` for generated chats,
contacts and messages, ``app`` for the routes, ``webhooks`` for deliveries, ``server`` to run it on a loopback
port and ``demo`` for the demo loop.
"""

from __future__ import annotations

from gateways.simulator.app import create_app
from gateways.simulator.demo import run_demo
from gateways.simulator.emitter import WebhookEmitter
from gateways.simulator.history import History, HistorySpec
from gateways.simulator.server import SimulatorServer
from gateways.simulator.state import (
    InstanceRemoved,
    QrCode,
    QrEmitted,
    SimEvent,
    SimInstance,
    SimulatorConfig,
    SimulatorError,
    SimulatorState,
    StateChange,
)

__all__ = [
    "History",
    "HistorySpec",
    "InstanceRemoved",
    "QrCode",
    "QrEmitted",
    "SimEvent",
    "SimInstance",
    "SimulatorConfig",
    "SimulatorError",
    "SimulatorServer",
    "SimulatorState",
    "StateChange",
    "WebhookEmitter",
    "create_app",
    "run_demo",
]
