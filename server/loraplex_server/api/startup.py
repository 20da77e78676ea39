"""One start-up sequence for every front end (the gRPC/HTTP server and each Ray replica): the key
store and serving state, then the model, its engine loop with the tenants' share weights, the
front end's own start-up adapters, and one warm-up request.

``bring_up_engine`` blocks (the model loads, adapters are read): a server runs it in a worker
thread, a replica in its constructor. Whatever fails, the loop is shut down before the error rises.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..config import Config, EngineConfig
from ..engine.engine import LLMEngine
from ..engine.loop import EngineLoop
from ..engine.request import Prompt, SamplingParams
from ..lora.ids import AdapterId
from ..metrics import Metrics
from .access import owner_of
from .adapter_store import AdapterStore, restore_adapters
from .auth import KeyStore
from .calls import ServingState

log = logging.getLogger(__name__)
EngineFactory = Callable[[EngineConfig], LLMEngine]


def serving_state(config: Config, metrics: Metrics | None = None) -> ServingState:
    """The key store (``--keys-file``; none: open mode, every caller an admin) and the state around it."""
    keys = KeyStore(config.server.keys_file)
    if keys.open_mode:
        log.warning("no keys file: running OPEN (development mode), every caller is an admin")
    return ServingState(metrics=metrics or Metrics(), keys=keys)


def bring_up_engine(config: Config, state: ServingState, engine_factory: EngineFactory,
                    on_unhealthy: Callable[[str], None] | None = None,
                    prepare: Callable[[EngineLoop], None] = lambda loop: None) -> EngineLoop:
    """Load the model, start its loop, ``prepare(loop)`` (start-up adapters), warm up; the loop runs.

    It is not published in ``state`` yet: the caller does that once its own start-up is done."""
    engine = engine_factory(config.engine)
    loop = EngineLoop(engine, state.metrics, on_unhealthy=on_unhealthy,
                      tenant_weight=lambda tenant: state.keys.limits_for(tenant).weight).start()
    try:
        prepare(loop)
        warm_up(loop)
    except BaseException:
        loop.shutdown()
        raise
    return loop


def warm_up(loop: EngineLoop) -> None:
    """One tiny request, so the first client's does not pay for lazy initialisation."""
    loop.generate(Prompt(token_ids=(0,)), SamplingParams(max_new_tokens=2))


def load_startup_adapters(loop: EngineLoop, config: Config, state: ServingState) -> None:
    """The configured adapters (``--adapter``), then those stored in ``--state-dir`` (an entry that
    cannot be restored is kept in ``state.restore_failures`` for ListAdapters)."""
    for name, path in config.server.adapters:
        loop.add_adapter(AdapterId(name), path, owner=owner_of(name))
    if config.server.state_dir is not None:
        state.store = AdapterStore(config.server.state_dir)
        state.restore_failures = restore_adapters(loop, state.store)
