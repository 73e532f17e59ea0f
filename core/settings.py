"""Settings from the environment and `.env`, one class per concern, read through cached getters.

The seeds' variable names work as given (EVOLUTION_API_URL, EVOLUTION_API_KEY, MEGA_API_HOST, MEGA_API_TOKEN,
CRON_SECRET, WEBHOOK_URL, DATABASE_URL), and WAHA's own (WAHA_API_URL, WAHA_API_KEY). More gateways can be named
in ZAPSYNC_GATEWAYS as JSON:
``{"evo-sp": {"provider": "evolution", "url": "https://...", "api_key": "..."}}``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.domain import Provider

_ENV = SettingsConfigDict(env_file=".env", env_ignore_empty=True, extra="ignore")


class GatewayConfig(BaseModel):
    """One configured gateway: a provider at a base URL with its key."""

    provider: Provider
    url: str
    api_key: SecretStr = SecretStr("")
    timeout_seconds: float = Field(default=10.0, gt=0)
    connect_timeout_seconds: float = Field(default=5.0, gt=0)
    max_concurrency: int = Field(default=32, ge=1, le=1024)
    """Parallel per-instance calls (MegaAPI status, Evolution live confirmations)."""

    # -- one call for every instance's live state (issue 12 §3) --
    metrics: bool = False
    """Read every instance's live state from the gateway's Prometheus `GET /metrics` in one call (Evolution with
    `PROMETHEUS_METRICS=true`, WAHA with `WAHA_PROMETHEUS_ENABLED=true`) instead of confirming them one by one."""
    metrics_user: str | None = None
    """Basic-auth user of Evolution's `/metrics` (its `METRICS_USER`, when `METRICS_AUTH_REQUIRED=true`)."""
    metrics_password: SecretStr | None = None
    """Basic-auth password of Evolution's `/metrics` (its `METRICS_PASSWORD`)."""

    @model_validator(mode="after")
    def _metrics_provider(self) -> GatewayConfig:
        if self.metrics and self.provider not in (Provider.EVOLUTION, Provider.WAHA):
            raise ValueError(f"metrics: provider {self.provider} serves no per-instance metrics")
        return self

    @field_validator("url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("gateway url must start with http:// or https://")
        return value.rstrip("/")


class Settings(BaseSettings):
    """Everything zapsync reads from its environment."""

    model_config = _ENV

    home: Path = Field(default=Path("~/.zapsync"), validation_alias=AliasChoices("ZAPSYNC_HOME"))
    database_url: SecretStr | None = Field(default=None, validation_alias=AliasChoices("DATABASE_URL"))

    evolution_api_url: str | None = Field(default=None, validation_alias="EVOLUTION_API_URL")
    evolution_api_key: SecretStr | None = Field(default=None, validation_alias="EVOLUTION_API_KEY")
    mega_api_host: str | None = Field(default=None, validation_alias="MEGA_API_HOST")
    mega_api_token: SecretStr | None = Field(default=None, validation_alias="MEGA_API_TOKEN")
    waha_api_url: str | None = Field(default=None, validation_alias="WAHA_API_URL")
    waha_api_key: SecretStr | None = Field(default=None, validation_alias="WAHA_API_KEY")
    evolution_metrics: bool = Field(default=False, validation_alias="EVOLUTION_METRICS")
    """The `evolution` gateway's live states come from its `/metrics` (set `PROMETHEUS_METRICS=true` there)."""
    evolution_metrics_user: str | None = Field(default=None, validation_alias="EVOLUTION_METRICS_USER")
    evolution_metrics_password: SecretStr | None = Field(default=None, validation_alias="EVOLUTION_METRICS_PASSWORD")
    """Evolution's `METRICS_USER`/`METRICS_PASSWORD` (when it sets `METRICS_AUTH_REQUIRED=true`)."""
    waha_metrics: bool = Field(default=False, validation_alias=AliasChoices("WAHA_METRICS", "WAHA_PROMETHEUS_ENABLED"))
    """The `waha` gateway's session statuses come from its `/metrics` (WAHA's own `WAHA_PROMETHEUS_ENABLED=true`)."""
    extra_gateways: dict[str, GatewayConfig] = Field(default_factory=dict, validation_alias="ZAPSYNC_GATEWAYS")
    default_gateway: str | None = Field(default=None, validation_alias="ZAPSYNC_DEFAULT_GATEWAY")
    """The gateway new instances are created at when a request names none and more than one is configured."""
    gateway_timeout_seconds: float = Field(default=10.0, gt=0, validation_alias="ZAPSYNC_GATEWAY_TIMEOUT")
    gateway_retry_attempts: int = Field(default=3, ge=1, le=10, validation_alias="ZAPSYNC_GATEWAY_RETRY_ATTEMPTS")
    gateway_retry_initial_seconds: float = Field(default=1.0, ge=0, validation_alias="ZAPSYNC_GATEWAY_RETRY_INITIAL")
    gateway_retry_max_seconds: float = Field(default=30.0, ge=0, validation_alias="ZAPSYNC_GATEWAY_RETRY_MAX")
    gateway_breaker_failures: int = Field(default=5, ge=1, validation_alias="ZAPSYNC_GATEWAY_BREAKER_FAILURES")
    gateway_breaker_recovery_seconds: float = Field(
        default=30.0, gt=0, validation_alias="ZAPSYNC_GATEWAY_BREAKER_RECOVERY"
    )

    secret_key: SecretStr | None = Field(default=None, validation_alias="ZAPSYNC_SECRET_KEY")
    """Seals the organizations' webhook secrets at rest (zapsync writes them into the gateways' webhook config).
    A Fernet key; unset, one is generated once in ``$ZAPSYNC_HOME/secret.key``. Every API replica and worker needs
    the same key."""
    cron_secret: SecretStr | None = Field(default=None, validation_alias="CRON_SECRET")
    admin_token: SecretStr | None = Field(default=None, validation_alias="ZAPSYNC_ADMIN_TOKEN")
    metrics_token: SecretStr | None = Field(default=None, validation_alias="ZAPSYNC_METRICS_TOKEN")
    """A token that may read `GET /metrics` and nothing else (the admin token may too): for a Prometheus scraper."""
    webhook_url: str | None = Field(default=None, validation_alias="WEBHOOK_URL")
    webhook_max_body_bytes: int = Field(default=1_048_576, ge=1024, validation_alias="ZAPSYNC_WEBHOOK_MAX_BODY")
    api_max_body_bytes: int = Field(default=1_048_576, ge=1024, validation_alias="ZAPSYNC_API_MAX_BODY")
    """Largest request body of every route but the webhooks (those have ``webhook_max_body_bytes``)."""
    webhook_event_time_tolerance_seconds: float = Field(
        default=900.0, ge=0, validation_alias="ZAPSYNC_WEBHOOK_EVENT_TIME_TOLERANCE"
    )
    """A payload timestamp older than this (or in the future) is not trusted; the receive time is used."""
    webhook_repeat_window_seconds: float = Field(default=5.0, ge=0, validation_alias="ZAPSYNC_WEBHOOK_REPEAT_WINDOW")
    """How long an API process answers an identical status event from memory, without touching the DB."""
    webhook_untracked_window_seconds: float = Field(
        default=3600.0, ge=1, validation_alias="ZAPSYNC_WEBHOOK_UNTRACKED_WINDOW"
    )
    """Deliveries for an instance the organization does not track keep one inbox row per instance and event, its
    payload refreshed at most once per this many seconds (a gateway's reconnect loop does not grow the inbox)."""
    webhook_jwt_leeway_seconds: float = Field(default=1800.0, ge=0, validation_alias="ZAPSYNC_WEBHOOK_JWT_LEEWAY")
    """How long after its `exp` an Evolution webhook JWT is still accepted: Evolution signs once before its retry
    loop (about 20 minutes of retries) and its tokens live 10 minutes, so late retries carry an expired token."""

    # -- the webhook spool for database outages (issue 13 §4) --
    spool_dir: Path | None = Field(default=None, validation_alias="ZAPSYNC_SPOOL_DIR")
    """Where the API journals authenticated webhooks while PostgreSQL is unreachable (default $ZAPSYNC_HOME/spool)."""
    spool_max_bytes: int = Field(default=256 * 1024 * 1024, ge=4096, validation_alias="ZAPSYNC_SPOOL_MAX_BYTES")
    """The journal's bound: past it deliveries are answered 503 with Retry-After, so the gateway retries."""

    api_host: str = Field(default="127.0.0.1", validation_alias="ZAPSYNC_API_HOST")
    api_port: int = Field(default=8000, ge=1, le=65535, validation_alias="ZAPSYNC_API_PORT")

    sync_interval_seconds: int = Field(default=300, ge=10, validation_alias="ZAPSYNC_SYNC_INTERVAL")
    sync_batch_size: int = Field(default=5000, ge=1, validation_alias="ZAPSYNC_SYNC_BATCH")
    sync_confirm_budget: int = Field(default=200, ge=0, validation_alias="ZAPSYNC_SYNC_CONFIRM_BUDGET")
    """Instances per run whose 'open' bulk status is confirmed live even when the DB agrees (rotating)."""
    sync_apply_tasks: int = Field(default=4, ge=1, validation_alias="ZAPSYNC_SYNC_APPLY_TASKS")
    """At most this many `apply-status` task runs per sync (batches grow past ``sync_batch_size`` to fit): a task
    run costs Prefect bookkeeping, and PostgreSQL gains nothing from more parallel writers on a small machine."""

    schedules_enabled: bool = Field(default=True, validation_alias="ZAPSYNC_SCHEDULES_ENABLED")
    """Whether the served deployments' schedules are active (tests switch them off)."""
    maintenance_batch_size: int = Field(default=5000, ge=1, validation_alias="ZAPSYNC_MAINTENANCE_BATCH")
    """Rows per batch: one transaction of a cleanup delete; one Prefect task of inactive-conversation closing."""
    close_inactive_concurrency: int = Field(default=2, ge=1, le=16, validation_alias="ZAPSYNC_CLOSE_CONCURRENCY")
    """Closing batches (tasks) of one organization running at once."""
    close_transaction_size: int = Field(default=1000, ge=1, validation_alias="ZAPSYNC_CLOSE_TRANSACTION")
    """Conversations closed per transaction: bounds how long a message writer can wait on a row being closed."""
    cleanup_timezone: str = Field(default="UTC", validation_alias="ZAPSYNC_CLEANUP_TIMEZONE")
    """Time zone of the daily 02:00 cleanup (an IANA name such as America/Sao_Paulo)."""
    webhook_retention_days: int = Field(default=30, ge=1, validation_alias="ZAPSYNC_WEBHOOK_RETENTION_DAYS")
    live_event_retention_days: int = Field(default=7, ge=1, validation_alias="ZAPSYNC_LIVE_EVENT_RETENTION_DAYS")
    report_retention_days: int = Field(default=30, ge=1, validation_alias="ZAPSYNC_REPORT_RETENTION_DAYS")
    monitor_interval_seconds: int = Field(default=60, ge=10, validation_alias="ZAPSYNC_MONITOR_INTERVAL")
    monitor_alert_after: int = Field(default=2, ge=1, validation_alias="ZAPSYNC_MONITOR_ALERT_AFTER")
    """Consecutive failed health checks that raise an alert."""
    monitor_reconnect_after: int = Field(default=3, ge=1, validation_alias="ZAPSYNC_MONITOR_RECONNECT_AFTER")
    """Consecutive failed health checks after which the instance is reconnected (once per failure streak)."""
    monitor_confirm_budget: int = Field(default=50, ge=0, validation_alias="ZAPSYNC_MONITOR_CONFIRM_BUDGET")
    """Healthy instances per run whose bulk 'open' is confirmed live (rotating); failing ones always are."""

    import_max_concurrency: int = Field(default=16, ge=1, le=64, validation_alias="ZAPSYNC_IMPORT_MAX_CONCURRENCY")
    """Instances one drain run imports at once. Measured with `bench storm` (1,000 instances × 100 messages): 4 took
    194 s, 16 took 98 s; each instance holds at most `import_page_concurrency` pages in memory."""
    import_page_size: int = Field(default=5000, ge=10, le=20_000, validation_alias="ZAPSYNC_IMPORT_PAGE_SIZE")
    """Records per gateway page, per database transaction and per Prefect task. Each task run costs the Prefect
    server tens of milliseconds of CPU (prefect-notes.md), so pages are large: 200 tasks for a million messages."""
    import_page_concurrency: int = Field(default=3, ge=1, le=16, validation_alias="ZAPSYNC_IMPORT_PAGE_CONCURRENCY")
    """Message pages of one import fetched and written at once."""
    import_stale_minutes: int = Field(default=15, ge=1, validation_alias="ZAPSYNC_IMPORT_STALE_MINUTES")
    """A running import without a checkpoint for this long is presumed dead; the status sync resumes it."""
    import_starts_per_sync: int = Field(default=100, ge=1, validation_alias="ZAPSYNC_IMPORT_STARTS_PER_SYNC")
    """Imports one status sync may request; instances beyond it stay pending for the next sync."""

    queue_lease_seconds: float = Field(default=120.0, gt=0, validation_alias="ZAPSYNC_QUEUE_LEASE")
    """How long a claimed work item stays with its claimer without a heartbeat before another run may take it."""
    queue_max_attempts: int = Field(default=5, ge=1, validation_alias="ZAPSYNC_QUEUE_MAX_ATTEMPTS")
    """Tries of one work item before it is marked failed."""
    queue_retry_initial_seconds: float = Field(default=5.0, ge=0, validation_alias="ZAPSYNC_QUEUE_RETRY_INITIAL")
    queue_retry_max_seconds: float = Field(default=300.0, ge=0, validation_alias="ZAPSYNC_QUEUE_RETRY_MAX")
    """Cap of the full-jitter delay before a failed work item is tried again (it doubles from the initial delay)."""
    queue_retention_days: int = Field(default=7, ge=1, validation_alias="ZAPSYNC_QUEUE_RETENTION_DAYS")
    """Finished queue items (done or failed) are kept this long for inspection, then the daily cleanup deletes them."""
    worker_nice: int = Field(default=10, ge=0, le=19, validation_alias="ZAPSYNC_WORKER_NICE")
    """How much the warm queue worker lowers its CPU priority (Unix niceness added at start; 0 keeps it): imports
    and sends are throughput work, so on a shared machine webhooks and the API's other requests are served first."""

    send_min_interval_seconds: float = Field(default=1.0, ge=0, validation_alias="ZAPSYNC_SEND_MIN_INTERVAL")
    """Minimum time between two sends of one instance (protects the number from WhatsApp's spam checks)."""
    send_timeout_seconds: float = Field(default=15.0, gt=0, validation_alias="ZAPSYNC_SEND_TIMEOUT")
    """How long a send waits for the gateway's answer; after that its outcome is unknown (never resent blindly)."""
    send_unknown_grace_seconds: float = Field(default=60.0, ge=0, validation_alias="ZAPSYNC_SEND_UNKNOWN_GRACE")
    """How long a send of unknown outcome waits for the gateway's echo before the gateway is asked and, if the
    message is not there, it is sent again."""
    send_max_concurrency: int = Field(default=32, ge=1, le=1024, validation_alias="ZAPSYNC_SEND_MAX_CONCURRENCY")
    """Instances one send drain serves at once (each instance's messages go one after another, in order)."""

    @field_validator("cleanup_timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    @field_validator("database_url", mode="before")
    @classmethod
    def _psycopg_driver(cls, value: Any) -> Any:
        if isinstance(value, str):
            for prefix in ("postgres://", "postgresql://"):
                if value.startswith(prefix):
                    return "postgresql+psycopg://" + value[len(prefix) :]
        return value

    @model_validator(mode="after")
    def _expand_home(self) -> Settings:
        self.home = self.home.expanduser()
        return self

    def gateways(self) -> dict[str, GatewayConfig]:
        """All configured gateways by name: the seeds' variables first, then ZAPSYNC_GATEWAYS."""
        found: dict[str, GatewayConfig] = {}
        if self.evolution_api_url:
            found["evolution"] = GatewayConfig(
                provider=Provider.EVOLUTION,
                url=self.evolution_api_url,
                api_key=self.evolution_api_key or SecretStr(""),
                timeout_seconds=self.gateway_timeout_seconds,
                metrics=self.evolution_metrics,
                metrics_user=self.evolution_metrics_user,
                metrics_password=self.evolution_metrics_password,
            )
        if self.mega_api_host:
            found["megaapi"] = GatewayConfig(
                provider=Provider.MEGAAPI,
                url=self.mega_api_host,
                api_key=self.mega_api_token or SecretStr(""),
                timeout_seconds=self.gateway_timeout_seconds,
            )
        if self.waha_api_url:
            found["waha"] = GatewayConfig(
                provider=Provider.WAHA,
                url=self.waha_api_url,
                api_key=self.waha_api_key or SecretStr(""),
                timeout_seconds=self.gateway_timeout_seconds,
                metrics=self.waha_metrics,
            )
        found.update(self.extra_gateways)
        return found

    @property
    def secret_key_file(self) -> Path:
        """Where the generated sealing key lives when ``ZAPSYNC_SECRET_KEY`` is unset."""
        return self.home / "secret.key"

    @property
    def spool_folder(self) -> Path:
        """Folder of the webhook spool's journal."""
        return (self.spool_dir or self.home / "spool").expanduser()

    @property
    def data_dir(self) -> Path:
        """Folder for the embedded PostgreSQL cluster."""
        return self.home / "pgdata"


API_KEY_SETTINGS = {"evolution": "EVOLUTION_API_KEY", "megaapi": "MEGA_API_TOKEN", "waha": "WAHA_API_KEY"}


def api_key_setting(gateway: str) -> str:
    """The setting holding ``gateway``'s key, as an operator would look for it."""
    return API_KEY_SETTINGS.get(gateway, f"the api_key of gateway {gateway!r} in ZAPSYNC_GATEWAYS")


@functools.cache
def get_settings() -> Settings:
    """The process's settings, read once; tests call ``get_settings.cache_clear()`` after changing env."""
    return Settings()
