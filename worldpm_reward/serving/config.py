"""The HTTP server's settings (:class:`ServerConfig`) and its bearer token.

Each field's ``metadata`` also declares its ``worldpm-reward serve`` flag: ``help``, and
where the flag differs from the field, ``flag`` (its name), ``scale`` (the flag is in units
of ``scale`` field units, e.g. MiB for bytes), ``zero_none`` (0 on the command line means
None), ``group`` (the help section); ``cli: False`` fields have no flag. The CLI builds its
serve flags from these fields, so a flag and its default are declared once, here.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from worldpm_reward.errors import ConfigError
from worldpm_reward.policy_text import FORMATS, REPLY_TURNS

logger = logging.getLogger(__name__)

TOKEN_ENV = "WORLDPM_REWARD_TOKEN"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
#: /get_reward's default reward for an item that cannot be scored: the low end of OpenRLHF's
#: default ``--reward.clip_range`` (-10, 10), so after OpenRLHF's clipping it never out-scores
#: a real answer, and OpenRLHF never receives a None (which breaks its step later).
DEFAULT_FALLBACK_REWARD = -10.0

_BOUNDS = "bounds (hostile or runaway clients)"
_OPENRLHF = "OpenRLHF (/get_reward)"


def _flag(help: str, **options: Any) -> dict[str, Any]:
    return {"help": help, **options}


@dataclass
class ServerConfig:
    """Settings of the HTTP server.

    Attributes:
        host: interface to bind; 127.0.0.1 (this machine only) unless told otherwise.
        port: TCP port.
        token: bearer token required on every endpoint except /health (None: no auth).
            The CLI reads it from the WORLDPM_REWARD_TOKEN environment variable.
        max_body_bytes: largest accepted request body, in bytes (larger: 413).
        max_items: most items in one request (larger: 413).
        max_queue: most samples waiting to be scored (more: 503 + Retry-After).
        max_wait_ms: how long a request waits for others to share its batch, in ms, when the
            scorer is idle (0: start at once; requests that arrive while a batch runs form the next).
        max_batch_samples: most samples per model call.
        max_piece_tokens: most estimated tokens per model call and per piece of a request
            (fair scheduling in tokens: a small request waits at most about one piece behind
            a token-heavy one); None: bounded by samples only.
        chat_format: how OpenRLHF queries are parsed ("auto", "chatml", "llama3", ...).
        reply_turns: how a query's text after its prompt is read ("as-written" or "one").
        name: reward name used in extra_logs keys and metrics labels.
        retry_after_s: the Retry-After value sent with every 503, in seconds.
        fallback_reward: /get_reward (OpenRLHF): an item that cannot be scored gets this
            reward and status 200 (flagged in extra_logs) instead of 422. Default -10 (the low
            end of OpenRLHF's default clip range); None: 422.
        openrlhf_scores: /get_reward's ``scores``: "reward" or "sigmoid" (in (0, 1), for
            OpenRLHF's dynamic filtering).
        scores_temperature: scale of the "sigmoid" mapping: ``sigmoid(reward / T)``.
        drain_timeout_s: on SIGTERM/SIGINT the server stops accepting and finishes every
            request already taken in; this caps how long that may take (None: no cap, so a
            full queue is always finished).
        max_request_tokens: most estimated tokens in one request (more: 413); None: no bound.
        max_queue_tokens: most estimated tokens waiting to be scored (more: 503 + Retry-After).
        max_upload_bytes: most request-body bytes held in memory by all uploads together
            (a body that would exceed it: 503 + Retry-After).
        body_timeout_s: a request body must arrive within this many seconds (else 408).
        header_timeout_s: a request's headers must arrive within this many seconds of its
            first byte, and a new connection must start its first request within it (else the
            connection is closed).
        idle_timeout_s: a connection that sends nothing for this long (before its first
            request, or between keep-alive requests) is closed.
        max_connections: most open connections and requests at once (more: 503).
        request_id_cache: how many answers are kept by ``X-Request-ID``, so a retried or
            hedged request is answered again without being scored (or counted by the running
            normalization) twice; 0 turns it off.
        request_id_cache_bytes: most bytes of answers kept by that cache (the oldest go first).
        allow_no_auth: serve without a token on a non-loopback host (otherwise refused).
    """

    host: str = field(default="127.0.0.1", metadata=_flag("interface to bind (default: this machine only)"))
    port: int = field(default=8000, metadata=_flag("TCP port"))
    token: str | None = field(default=None, metadata={"cli": False})  # from WORLDPM_REWARD_TOKEN
    max_body_bytes: int = field(
        default=16 * 2**20, metadata=_flag("largest request body", flag="--max-body-mb", scale=2**20)
    )
    max_items: int = field(default=4096, metadata=_flag("most items in one request (413)", group=_BOUNDS))
    max_queue: int = field(default=8192, metadata=_flag("most queued samples before 503"))
    max_wait_ms: float = field(
        default=0.0,
        metadata=_flag(
            "how long a request waits for company when the scorer is idle (default 0: requests that "
            "arrive while a batch runs form the next batch)"
        ),
    )
    max_batch_samples: int = field(default=256, metadata=_flag("most samples per model call"))
    max_piece_tokens: int | None = field(
        default=65536,
        metadata=_flag(
            "most estimated tokens per model call and per piece of a request: a small request waits "
            "at most about one piece behind a token-heavy one; 0: no token bound",
            zero_none=True,
        ),
    )
    chat_format: str = field(
        default="auto", metadata=_flag("the POLICY's chat format in OpenRLHF queries", choices=FORMATS)
    )
    reply_turns: str = field(
        default="as-written",
        metadata=_flag(
            "how a query's text after its prompt is read: 'as-written' parses the turns written there "
            "(environment feedback turns in OpenRLHF's agent mode); 'one' takes it all as ONE reply "
            "whose markup is text, so a policy cannot forge a turn to have another reply scored "
            "(needs 'prompts'; use it for single-turn training)",
            choices=REPLY_TURNS,
            group=_OPENRLHF,
        ),
    )
    name: str = field(default="worldpm", metadata=_flag("reward name in extra_logs and metrics"))
    retry_after_s: int = field(default=1, metadata=_flag("the Retry-After header of every 503, in seconds"))
    fallback_reward: float | None = field(
        default=DEFAULT_FALLBACK_REWARD,
        metadata=_flag(
            "an item that cannot be scored gets this reward (flagged <name>_failed in extra_logs) "
            "instead of a 422, which OpenRLHF retries and then turns into a None that breaks its step "
            "(default: -10, the low end of OpenRLHF's default clip range; 'none': answer 422)",
            group=_OPENRLHF,
        ),
    )
    drain_timeout_s: float | None = field(
        default=None,
        metadata=_flag(
            "on SIGTERM/SIGINT (also a second Ctrl-C), finish accepted requests for at most this many "
            "seconds, whatever the scorer does (default: no cap)",
            flag="--drain-timeout",
        ),
    )
    openrlhf_scores: Literal["reward", "sigmoid"] = field(
        default="reward",
        metadata=_flag(
            "'scores' for OpenRLHF's dynamic filtering, whose range defaults to (0, 1): the reward, "
            "or sigmoid(reward / --scores-temperature)",
            group=_OPENRLHF,
        ),
    )
    scores_temperature: float = field(
        default=1.0, metadata=_flag("scale of --openrlhf-scores sigmoid", group=_OPENRLHF)
    )
    max_request_tokens: int | None = field(
        default=2_000_000,
        metadata=_flag("most estimated tokens per request (413); 0: none", zero_none=True, group=_BOUNDS),
    )
    max_queue_tokens: int | None = field(
        default=8_000_000,
        metadata=_flag("most estimated tokens queued (503); 0: none", zero_none=True, group=_BOUNDS),
    )
    max_upload_bytes: int = field(
        default=256 * 2**20,
        metadata=_flag(
            "most body bytes held by all uploads (503)", flag="--max-upload-mb", scale=2**20, group=_BOUNDS
        ),
    )
    body_timeout_s: float = field(
        default=60.0,
        metadata=_flag("seconds for a request body to arrive (408)", flag="--body-timeout", group=_BOUNDS),
    )
    header_timeout_s: float = field(
        default=30.0,
        metadata=_flag(
            "seconds for a connection's request headers to arrive", flag="--header-timeout", group=_BOUNDS
        ),
    )
    idle_timeout_s: float = field(
        default=5.0,
        metadata=_flag("idle connections are closed after this", flag="--idle-timeout", group=_BOUNDS),
    )
    max_connections: int | None = field(
        default=4096, metadata=_flag("most open connections (503); 0: none", zero_none=True, group=_BOUNDS)
    )
    request_id_cache: int = field(
        default=4096,
        metadata=_flag(
            "answers kept by X-Request-ID so retries/hedges are not scored twice; 0: off", group=_BOUNDS
        ),
    )
    request_id_cache_bytes: int = field(
        default=64 * 2**20,
        metadata=_flag(
            "most answer bytes kept by --request-id-cache",
            flag="--request-id-cache-mb",
            scale=2**20,
            group=_BOUNDS,
        ),
    )
    allow_no_auth: bool = field(
        default=False,
        metadata=_flag(
            f"serve a non-loopback --host without a bearer token (refused unless {TOKEN_ENV} is set)",
            flag="--no-auth",
        ),
    )


def resolve_token(config: ServerConfig) -> None:
    """The bearer token from the config or WORLDPM_REWARD_TOKEN, surrounding whitespace
    stripped (a trailing newline from a file would otherwise refuse every client); refuses
    (ConfigError) to serve a non-loopback host without one unless ``allow_no_auth``."""
    token = config.token if config.token is not None else os.environ.get(TOKEN_ENV)
    if token is not None and token != token.strip():
        logger.warning(
            "the bearer token has surrounding whitespace (e.g. a trailing newline); it is stripped"
        )
        token = token.strip()
    config.token = token or None
    if config.host not in LOOPBACK and config.token is None:
        if not config.allow_no_auth:
            raise ConfigError(
                f"refusing to serve on {config.host} without a bearer token: anyone who can reach it could "
                f"use it. Set {TOKEN_ENV}, bind --host 127.0.0.1, or pass --no-auth to serve without one"
            )
        logger.warning(
            "serving on %s without a bearer token (--no-auth): anyone who can reach it can use it",
            config.host,
        )


__all__ = ["DEFAULT_FALLBACK_REWARD", "TOKEN_ENV", "ServerConfig", "resolve_token"]
