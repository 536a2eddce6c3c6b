"""Scheduler role: finds hits in the agent, leases them, and plans loads and saves per step."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvfabric.connector import protocol as p
from kvfabric.connector.client import AgentClient
from kvfabric.connector.config import ConnectorConfig
from kvfabric.connector.errors import AgentError, AgentUnavailable
from kvfabric.connector.freed_blocks import FreedBlocks
from kvfabric.connector.identity import checkpoint_fingerprint
from kvfabric.connector.keys import chain_keys, mm_block_extras, request_seed
from kvfabric.connector.metadata import (
    KVFabricMetadata,
    LoadIntent,
    SaveIntent,
    StagedSave,
    lease_id_for,
    lease_of_rank,
)
from kvfabric.connector.router_names import annotation
from kvfabric.connector.trace import mark

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

#: Steps after which the scheduler ends a finished request's leases a worker may have been
#: handed (a worker copies in the step that carries the intent; async scheduling runs one ahead).
_RELEASE_AFTER_STEPS = 2
#: Reports in a row in which the workers' loads all failed (none loaded) before the scheduler
#: stops finding hits for a while (a worker that cannot load turns each hit into wasted work).
_FAILED_LOAD_REPORTS = 3
_LOAD_BACKOFF_S = (10.0, 300.0)  # first pause, longest pause
#: Requests whose voided epochs are remembered for staged saves still to come (requests of
#: failed loads only; a save is staged within a step or two of its plan, so thousands suffice).
_VOIDED_REQUESTS = 65536
#: Reports a delegated commit is retried in while the agent cannot be reached.
_COMMIT_ATTEMPTS = 3
#: A step schedules at least this many tokens to count as a sample of the engine's prefill rate
#: (fewer: decode steps, whose time per token says nothing about prefill).
_PREFILL_SAMPLE_TOKENS = 256


@dataclass
class _PendingLoad:
    lease_id: str
    pool_id: str
    first_block: int
    slots: list[list[int]]
    leases: list[str]
    session: int = 0  # the agent session that holds the lease


@dataclass
class _RequestState:
    keys: list[bytes]
    prompt_len: int
    seed: bytes
    #: vLLM's request, whose ``all_token_ids`` grow as tokens are generated.
    request: Request | None = None
    block_ids: list[int] = field(default_factory=list)
    #: Blocks before this index are in the agent already, or have been handed to a worker to save.
    saved_upto: int = 0
    pending: _PendingLoad | None = None
    lease_id: str | None = None
    #: the agent's ids of exactly the leases taken (with their generation), per TP rank
    leases: list[str] = field(default_factory=list)
    #: A load intent for the lease went to the workers: they release it after their copy. Ending
    #: it here (an abort mid-load) would let its blocks be evicted under the copy.
    handed_over: bool = False
    #: A save was planned: with background saves vLLM must keep the blocks until it is done.
    had_saves: bool = False
    #: Per block, multimodal items its key must cover (:func:`mm_block_extras`).
    extras: dict[int, bytes] = field(default_factory=dict)
    #: Never looked up nor saved: its KV does not follow from token ids we can key (embeddings).
    uncacheable: bool = False
    #: The agent was asked whether it holds the blocks vLLM had cached locally.
    checked_local: bool = False
    #: Until when (monotonic) the request waits for blocks the agent promotes from NVMe.
    promote_until: float | None = None
    #: One more after each load of this request that failed (see ``SaveIntent.epoch``).
    epoch: int = 0
    #: P/D decode side: leading blocks a prefill engine promised to put in the pool, and until
    #: when (monotonic) the request waits for them (see :meth:`SchedulerSide.handoff_promise`).
    promised: int = 0
    handoff_until: float | None = None
    #: the latest step that scheduled the request (its blocks' GPU work ends with that step)
    last_step: int = 0


@dataclass
class SchedulerStats:
    lookups: int = 0
    lookup_failures: int = 0
    hit_tokens: int = 0
    loads_planned: int = 0
    blocks_to_load: int = 0
    blocks_to_save: int = 0
    promote_waits: int = 0
    promote_too_slow: int = 0
    #: promotions (NVMe reads, pulls from peers) not waited for: recomputing those blocks at the
    #: engine's measured prefill rate is sooner than the agent's estimate of their arrival
    promote_recompute_sooner: int = 0
    #: P/D: promises made (prefill side); waits for promised blocks and handoffs that ended
    #: with fewer blocks than promised (decode side)
    handoffs_promised: int = 0
    handoff_waits: int = 0
    handoffs_short: int = 0
    #: TP: blocks the workers wrote that the scheduler committed, or voided after a failed load
    staged_committed: int = 0
    staged_voided: int = 0
    #: GPU engines: loads the agent started when vLLM allocated their blocks, and loads left to
    #: the workers because a block may still be in use by the engine's GPU work
    loads_prefetched: int = 0
    prefetch_unsafe: int = 0


class SchedulerSide:
    def __init__(
        self,
        config: ConnectorConfig,
        namespaces: list[str],
        block_size: int,
        engine_tag: str,
        background_saves: bool = False,
        prefetch: bool = False,
    ) -> None:
        """``prefetch``: the engine's KV layout lets the agent start loads at allocation (GPU
        engines whose one KV-cache group is full attention: vLLM frees no block of a running
        request); it happens only once the workers named their registrations."""
        self.config = config
        self.background_saves = background_saves
        self.namespaces = namespaces
        self.block_size = block_size
        self.engine_tag = engine_tag
        self.client = AgentClient.from_config(config, f"scheduler:{engine_tag}")
        self.requests: dict[str, _RequestState] = {}
        self._loras: dict[tuple[str, str], str] = {}
        self._loads: list[LoadIntent] = []
        #: (step, lease ids) of finished requests whose leases workers may still be copying
        #: under: released a few steps later (the workers' own release usually came first).
        self._deferred: list[tuple[int, list[str]]] = []
        self._step = 0
        self._failed_reports = 0
        self._loads_off_until = 0.0
        self._load_backoff_s = 0.0
        #: request -> the latest epoch voided by a failed load (its staged saves are aborted)
        self._voided: OrderedDict[str, int] = OrderedDict()
        #: delegated commits the agent did not get yet, with the attempts left
        self._undelivered: list[tuple[int, list[StagedSave]]] = []
        #: vLLM's names of blocks planned this step, for an agent that publishes KV events
        self._annotations: list[p.Annotate] = []
        self.stats = SchedulerStats()
        #: the engine's prefill rate, tokens/s (a moving average of prefill-sized steps, from the
        #: schedule of a step to its output); 0: not measured yet
        self.prefill_tokens_per_s = 0.0
        #: (when scheduled, tokens) of steps whose output has not come back (async scheduling
        #: keeps one step ahead)
        self._steps_in_flight: deque[tuple[float, int]] = deque(maxlen=4)
        self.prefetch = prefetch and config.prefetch_loads
        self.freed = FreedBlocks()
        #: TP rank -> the token of its worker's GPU registration (from the workers' metadata)
        self._prefetch_targets: dict[int, bytes] = {}
        if not self.client.connect():  # early, so the agent lists this engine; failure is fine
            log.warning("agent not reachable yet; serving without it", extra={"socket": config.socket_path})

    # -- lookups -------------------------------------------------------------------------------------

    def _state(self, request: Request, prompt: Sequence[int]) -> _RequestState:
        st = self.requests.get(request.request_id)
        if st is None:
            seed = request_seed(self._salt(request))
            # Prompt embeddings (whole or mixed with tokens): the ids at their positions are
            # placeholders, so no key of ours can tell two such prompts apart. Never cached.
            uncacheable = getattr(request, "prompt_embeds", None) is not None
            try:
                extras = mm_block_extras(getattr(request, "mm_features", None) or [], self.block_size)
            except ValueError:
                uncacheable, extras = True, {}
            keys = [] if uncacheable else chain_keys(prompt, self.block_size, seed, extras=extras)
            st = _RequestState(
                keys=keys,
                prompt_len=len(prompt),
                seed=seed,
                request=request,
                extras=extras,
                uncacheable=uncacheable,
            )
            self.requests[request.request_id] = st
        return st

    def _salt(self, request: Request) -> list[str]:
        lora = request.lora_request
        return [request.cache_salt or "", self._lora_identity(lora) if lora is not None else ""]

    def _lora_identity(self, lora: object) -> str:
        """An adapter by name, path and a fingerprint of its weight files (vLLM's own prefix cache
        keys name and path; two adapters of one name with other weights must never share)."""
        name, path = str(getattr(lora, "lora_name", "")), str(getattr(lora, "lora_path", "") or "")
        cached = self._loras.get((name, path))
        if cached is None:
            from pathlib import Path

            fingerprint = checkpoint_fingerprint(Path(path)) if path and Path(path).is_dir() else None
            cached = self._loras[(name, path)] = f"lora:{name}|{path}|{fingerprint or ''}"
        return cached

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        prompt = request.prompt_token_ids
        if prompt is None:
            return 0, False
        st = self._state(request, prompt)
        if st.uncacheable or getattr(request, "skip_reading_prefix_cache", False):
            # vLLM 0.26's scheduler asks us even for requests that must compute every prompt
            # token (prompt logprobs, pooling): no external hits for those.
            return 0, False
        local = num_computed_tokens // self.block_size
        # vLLM must compute at least one prompt token itself, so a full-prompt hit stops short.
        usable = min(len(st.keys), (len(prompt) - 1) // self.block_size)
        st.saved_upto = max(st.saved_upto, self._held_by_agent(st, local))
        if not self.config.load or usable <= local or time.monotonic() < self._loads_off_until:
            return 0, False
        pending = st.pending
        hello = self.client.hello
        if (
            pending is not None
            and pending.first_block == local
            and hello
            and hello.session_id == pending.session
        ):
            # Asked again before any blocks were allocated (vLLM retries a waiting request every
            # step while the GPU cache is full): the lease we hold still covers the answer. A new
            # lookup would re-lease the same blocks each time (thousands of leases per load).
            return len(pending.slots[0]) * self.block_size, False
        lease_id = lease_id_for(self.engine_tag, request.request_id)
        self.stats.lookups += 1
        mark("lookup", blocks=usable - local)
        now = time.monotonic()
        awaited = self._awaited_blocks(request, st, usable, now)
        wait = st.promote_until is None or now < st.promote_until or awaited > 0
        try:
            reply = self.client.lookup(
                self.namespaces, st.keys[local:usable], self.block_size, lease_id, promote=wait
            )
        except AgentError as exc:
            self.stats.lookup_failures += 1
            log.debug("lookup failed, recomputing", extra={"req": request.request_id, "error": str(exc)})
            st.pending = None
            return 0, False
        if awaited and local + reply.hits < awaited:
            # P/D: the prefill engine's blocks are still on their way (its save commits, the
            # index learns of it, our agent pulls them): ask again in a later step.
            st.pending = None
            st.lease_id = lease_id
            st.leases = list(reply.leases)
            self.stats.handoff_waits += 1
            if reply.promoting:
                self._annotate(request, st, local + reply.hits, local + reply.hits + reply.promoting)
            return None, False
        st.promised = 0  # kept (or given up): a later lookup of this request waits no more
        if reply.promoting and wait and self.config.promote_wait_ms:
            if st.promote_until is None:
                st.promote_until = now + self.config.promote_wait_ms / 1000
            eta_s = reply.promote_eta_ms / 1000
            if eta_s > st.promote_until - now:
                # They would come later than we may wait: recomputing is sooner. (They still
                # land in the pool, for the requests after this one.)
                st.promote_until = now
                self.stats.promote_too_slow += 1
            elif self.prefill_tokens_per_s and eta_s > self._recompute_s(reply.promoting):
                # The cost model: this engine computes those blocks sooner than the link (or
                # disk) brings them, at the rates measured for both.
                st.promote_until = now
                self.stats.promote_recompute_sooner += 1
        if reply.promoting and st.promote_until is not None and now < st.promote_until:
            # Blocks are on their way from the agent's NVMe tier: ask again in a later step
            # (vLLM defers only this request). The lease of the hits so far is replaced then.
            st.pending = None
            st.lease_id = lease_id
            st.leases = list(reply.leases)
            self.stats.promote_waits += 1
            self._annotate(request, st, local + reply.hits, local + reply.hits + reply.promoting)
            return None, False
        if reply.hits == 0:
            st.pending = None
            return 0, False
        session = self.client.hello.session_id if self.client.hello else 0
        st.pending = _PendingLoad(lease_id, reply.pool_id, local, reply.slots, reply.leases, session)
        st.lease_id = lease_id
        st.leases = list(reply.leases)
        if st.saved_upto >= local:  # else the gap below ``local`` is saved first
            st.saved_upto = max(st.saved_upto, local + reply.hits)
        self.stats.hit_tokens += reply.hits * self.block_size
        mark("lookup_done", hits=reply.hits)
        return reply.hits * self.block_size, False

    def _recompute_s(self, blocks: int) -> float:
        """Seconds this engine takes to compute ``blocks`` blocks, at its measured prefill rate."""
        return blocks * self.block_size / self.prefill_tokens_per_s

    def _step_done(self) -> None:
        """A step's output came back: its time is a sample of the prefill rate if it was large."""
        if not self._steps_in_flight:
            return
        started, tokens = self._steps_in_flight.popleft()
        if tokens < _PREFILL_SAMPLE_TOKENS:
            return
        rate = tokens / max(time.monotonic() - started, 1e-6)
        r = self.prefill_tokens_per_s
        self.prefill_tokens_per_s = rate if not r else 0.7 * r + 0.3 * rate

    def _awaited_blocks(self, request: Request, st: _RequestState, usable: int, now: float) -> int:
        """P/D decode side: how many leading blocks to wait for (0: none, or no longer).

        A prefill engine's :meth:`handoff_promise` rides in the request's ``kv_transfer_params``
        (a disaggregating proxy copies them from the prefill response): it names how many
        blocks it saved and the key of the last, so a decode engine whose keys differ (another
        model or layout) does not wait in vain. The wait ends at ``handoff_wait_ms``; what has
        not arrived by then is recomputed."""
        if st.handoff_until is None:
            promise = (getattr(request, "kv_transfer_params", None) or {}).get("kvfabric")
            st.handoff_until = now  # asked once: no promise, or a broken one, means no wait
            if not isinstance(promise, dict) or not self.config.handoff_wait_ms:
                return 0
            blocks, last = promise.get("blocks"), promise.get("last_key")
            if not isinstance(blocks, int) or not isinstance(last, str) or not 0 < blocks <= len(st.keys):
                return 0
            if st.keys[blocks - 1].hex() != last:
                log.info(
                    "a P/D promise for other keys (model or layout) is ignored",
                    extra={"req": request.request_id},
                )
                return 0
            st.promised = min(blocks, usable)
            st.handoff_until = now + self.config.handoff_wait_ms / 1000
        if st.promised and now >= st.handoff_until:
            self.stats.handoffs_short += 1
            log.info(
                "promised blocks did not all arrive in time; computing the rest",
                extra={"req": request.request_id, "promised": st.promised},
            )
            st.promised = 0
        return st.promised

    def handoff_promise(self, request: Request, st: _RequestState) -> dict[str, object] | None:
        """P/D prefill side: for a request sent with ``kv_transfer_params.do_remote_decode``
        (vLLM's convention, which its disaggregation proxies use), the blocks of its prompt this
        engine saved (or planned to: the saves may still be in flight), for the decode engine."""
        params = getattr(request, "kv_transfer_params", None) or {}
        if not params.get("do_remote_decode") or not self.config.save or self.client.hello is None:
            return None
        blocks = min(st.saved_upto, len(st.keys), st.prompt_len // self.block_size)
        if blocks == 0:
            return None
        self.stats.handoffs_promised += 1
        return {"kvfabric": {"blocks": blocks, "last_key": st.keys[blocks - 1].hex()}}

    def _annotate(self, request: Request, st: _RequestState, start: int, end: int) -> None:
        """Queues vLLM's names of blocks ``start:end`` for an agent that publishes KV events."""
        if end > start and self.client.supports(p.KV_EVENTS_FEATURE):
            item = annotation(request, self.namespaces[0], st.keys, start, end, self.block_size)
            if item is not None:
                self._annotations.append(item)

    def _send_annotations(self) -> None:
        items, self._annotations = self._annotations, []
        for item in items:
            try:
                self.client.call(item, p.AnnotateReply)
            except AgentError as exc:  # routers miss these blocks; serving goes on
                log.debug("annotations not delivered", extra={"error": str(exc)})
                return

    def _held_by_agent(self, st: _RequestState, local: int) -> int:
        """How many of the ``local`` blocks vLLM found in its own prefix cache the agent holds
        too (asked once per request, no lease). The rest are saved from vLLM's copy: after an
        agent restart, or a save that was skipped, its prefixes become hits again for others."""
        if local == 0 or st.checked_local or not self.config.save:
            return local
        st.checked_local = True
        try:
            return self.client.lookup(self.namespaces, st.keys[:local], self.block_size).hits
        except AgentError:
            return local  # unknown: do not flood a failing agent with saves

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        st = self.requests.get(request.request_id)
        if st is None or st.pending is None:
            return
        pending, st.pending = st.pending, None
        if num_external_tokens == 0:
            self._release(st)
            return
        n = num_external_tokens // self.block_size
        block_ids = blocks.get_block_ids()[0]
        ids = block_ids[pending.first_block : pending.first_block + n]
        self._loads.append(
            LoadIntent(
                req_id=request.request_id,
                lease_id=pending.lease_id,
                pool_id=pending.pool_id,
                block_ids=tuple(ids),
                slots=tuple(tuple(s[:n]) for s in pending.slots),
                leases=tuple(pending.leases),
                epoch=st.epoch,
            )
        )
        st.handed_over = True
        self.stats.loads_planned += 1
        self.stats.blocks_to_load += n

    # -- per step --------------------------------------------------------------------------------------

    def build_connector_meta(self, out: SchedulerOutput) -> KVFabricMetadata:
        self._step += 1
        if self.prefetch:  # which blocks a prefetch may write (FreedBlocks)
            if out.preempted_req_ids:
                self.freed.barrier(self._step)  # their blocks were freed without being listed to us
            for req_id in out.num_scheduled_tokens:
                if (scheduled := self.requests.get(req_id)) is not None:
                    scheduled.last_step = self._step
        self._steps_in_flight.append((time.monotonic(), sum(out.num_scheduled_tokens.values())))
        while self._deferred and self._deferred[0][0] <= self._step - _RELEASE_AFTER_STEPS:
            _, lease_ids = self._deferred.pop(0)
            with contextlib.suppress(AgentError):
                self.client.release(lease_ids)
        loads, self._loads = self._loads, []
        if loads:
            mark("meta", step=self._step, loads=len(loads))
        meta = KVFabricMetadata(loads=self._prefetch(loads), step=self._step)
        if not self.config.save:
            return meta
        if self.background_saves and out.preempted_req_ids:
            meta.preempted = tuple(
                r for r in out.preempted_req_ids if (st := self.requests.get(r)) is not None and st.had_saves
            )
        for new in out.scheduled_new_reqs:
            st = self.requests.get(new.req_id)
            if st is None:
                continue
            st.block_ids = list(new.block_ids[0])
            done = new.num_computed_tokens + out.num_scheduled_tokens.get(new.req_id, 0)
            self._plan_save(new.req_id, st, done, meta)
        cached = out.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self.requests.get(req_id)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                st.block_ids = list(new_ids[0]) if new_ids is not None else []
            elif new_ids is not None:
                st.block_ids.extend(new_ids[0])
            done = cached.num_computed_tokens[i] + out.num_scheduled_tokens.get(req_id, 0)
            self._plan_save(req_id, st, done, meta)
        if self._annotations:
            self._send_annotations()
        return meta

    def prefetch_into(self, rank: int, token: bytes) -> None:
        """TP rank ``rank``'s worker registration takes prefetches under ``token`` (from vLLM's
        handshake at engine start, or a worker's metadata after it registered again)."""
        self._prefetch_targets[rank] = token

    def _prefetch(self, loads: list[LoadIntent]) -> list[LoadIntent]:
        """Has the agent queue this step's loads now, into blocks no GPU work of the engine may
        still touch, while vLLM prepares the step; the workers then only wait for them. A load
        the agent did not queue (or any failure here) is left to the workers, as without."""
        if not (self.prefetch and loads and self._prefetch_targets):
            return loads
        safe = [i for i in loads if self.freed.safe(i.block_ids)]
        self.stats.prefetch_unsafe += len(loads) - len(safe)
        ranks = [r for r in sorted(self._prefetch_targets) if r < len(self.namespaces)]
        if not safe or not ranks:
            return loads
        block_ids = [b for i in safe for b in i.block_ids]  # the same blocks on every rank
        request = p.GpuPrefetch(
            loads=[
                p.PrefetchLoad(
                    token=self._prefetch_targets[r],
                    block_ids=block_ids,
                    slots=[s for i in safe for s in i.slots[r]],
                )
                for r in ranks
            ],
            event_set=self._step % p.EVENT_SETS,
        )
        mark("prefetch", blocks=len(block_ids))
        try:
            reply = self.client.call(request, p.GpuPrefetchReply)
            mark("prefetch_queued", queued=sum(reply.queued))
        except AgentError as exc:
            log.debug("prefetch failed; the workers load", extra={"error": str(exc)})
            return loads
        tokens = [b""] * len(self.namespaces)
        for r, queued in zip(ranks, reply.queued, strict=False):
            if queued:
                tokens[r] = self._prefetch_targets[r]
        if not any(tokens):
            return loads
        chosen = {id(i) for i in safe}
        self.stats.loads_prefetched += len(safe)
        return [dataclasses.replace(i, prefetched=tuple(tokens)) if id(i) in chosen else i for i in loads]

    def _plan_save(self, req_id: str, st: _RequestState, computed: int, meta: KVFabricMetadata) -> None:
        self._extend_keys(st, computed)
        limit = computed if self.config.save_generated else min(computed, st.prompt_len)
        full = min(limit // self.block_size, len(st.keys), len(st.block_ids))
        if full <= st.saved_upto:
            return
        start = st.saved_upto
        meta.saves.append(
            SaveIntent(
                req_id=req_id,
                block_ids=tuple(st.block_ids[start:full]),
                keys=tuple(st.keys[start:full]),
                parent=st.keys[start - 1] if start else None,
                epoch=st.epoch,
            )
        )
        self.stats.blocks_to_save += full - start
        st.saved_upto = full
        st.had_saves = True
        if st.request is not None:
            self._annotate(st.request, st, start, full)

    def _extend_keys(self, st: _RequestState, computed: int) -> None:
        """Keys for blocks that generated tokens filled (their KV is computed: ``computed``)."""
        if not self.config.save_generated or st.request is None or st.uncacheable:
            return
        tokens = st.request.all_token_ids
        n_full = min(computed, len(tokens)) // self.block_size
        if n_full > len(st.keys):
            st.keys += chain_keys(  # reads only the new blocks' tokens, not the whole context
                tokens,
                self.block_size,
                st.seed,
                start_block=len(st.keys),
                parent=st.keys[-1] if st.keys else None,
                extras=st.extras,
                end_block=n_full,
            )

    def update_connector_output(
        self,
        loaded_blocks: int,
        load_errors: int,
        invalid_block_ids: Collection[int] = (),
        staged: Sequence[StagedSave] = (),
        prefetch_targets: Sequence[tuple[int, bytes]] = (),
        completed_step: int = 0,
    ) -> None:
        """The workers' load counts since their last report (their stats, which vLLM hands to
        the scheduler): when several reports in a row show failed loads and none that worked, the
        workers cannot load (disabled, pool not mapped, agent gone for them), and hits are not
        offered for a while, doubling each time. One working load resets it.

        ``invalid_block_ids``: vLLM blocks whose load failed; vLLM recomputes from the first of
        them. Each request holding one starts a new epoch and plans its saves again from there,
        so the recomputed (correct) blocks reach the pool; the workers drop the old epoch's.

        ``staged``: blocks TP workers wrote this step (or, saving in the background, lately).
        A load failure of a step reaches us no later than that step's saves, so the epochs
        voided by now are final for them: the rest are committed, the voided aborted.

        ``prefetch_targets``: (TP rank, token) of GPU registrations that take prefetches;
        ``completed_step``: the step whose output this is, as the workers ran it (0: unknown)."""
        self._step_done()
        self.freed.completed_through(completed_step)
        for rank, token in prefetch_targets:
            self.prefetch_into(rank, token)
        if invalid_block_ids:
            self._recompute_from(set(invalid_block_ids))
        if staged or self._undelivered:
            self._settle(list(staged))
        if loaded_blocks:
            self._failed_reports = 0
            self._load_backoff_s = 0.0
            return
        if not load_errors:
            return
        self._failed_reports += 1
        if self._failed_reports >= _FAILED_LOAD_REPORTS:
            first, longest = _LOAD_BACKOFF_S
            self._load_backoff_s = min(longest, max(first, 2 * self._load_backoff_s))
            self._loads_off_until = time.monotonic() + self._load_backoff_s
            self._failed_reports = 0
            log.warning(
                "the workers could not load any of the last hits; not offering hits for %.0f s",
                self._load_backoff_s,
            )

    def _recompute_from(self, invalid: set[int]) -> None:
        for req_id, st in self.requests.items():
            first = next((j for j, b in enumerate(st.block_ids) if b in invalid), None)
            if first is not None:
                self._voided[req_id] = st.epoch
                self._voided.move_to_end(req_id)
                if len(self._voided) > _VOIDED_REQUESTS:
                    self._voided.popitem(last=False)
                st.epoch += 1
                st.saved_upto = min(st.saved_upto, first)

    def _settle(self, staged: list[StagedSave]) -> None:
        """Commits (or aborts) the workers' staged blocks for them, one call per worker and
        namespace. A call that fails is retried with the next reports, then given up: the
        worker's reservations end with its session."""
        batches = [(_COMMIT_ATTEMPTS, staged)] if staged else []
        batches += self._undelivered
        self._undelivered = []
        for attempts, items in batches:
            groups: dict[tuple[int, str, str], list[StagedSave]] = {}
            for item in items:
                groups.setdefault((item.owner, item.owner_token, item.namespace), []).append(item)
            failed: list[StagedSave] = []
            for (owner, token, namespace), group in groups.items():
                keep: list[bytes] = []
                drop: list[bytes] = []
                for item in group:
                    voided = item.epoch <= self._voided.get(item.req_id, -1)
                    (drop if voided else keep).extend(item.keys)
                try:
                    done = self.client.commit(namespace, keep, drop, 0.0, owner=owner, owner_token=token)
                except AgentUnavailable as exc:  # retried; a refusal (agent restarted: owner unknown) is not
                    log.debug("delegated commit failed", extra={"error": str(exc)})
                    failed += group
                    continue
                except AgentError as exc:
                    log.debug("delegated commit refused", extra={"error": str(exc)})
                    continue
                self.stats.staged_committed += done.committed
                self.stats.staged_voided += len(drop)
                if drop:
                    log.warning(
                        "not committing blocks computed on top of a failed load on some TP rank",
                        extra={"blocks": len(drop)},
                    )
            if failed and attempts > 1:
                self._undelivered.append((attempts - 1, failed))

    def request_finished(
        self, request: Request, block_ids: Sequence[int] = ()
    ) -> tuple[bool, dict[str, object] | None]:
        """Drops the request; True if vLLM must keep its blocks until the workers' saves end,
        and the P/D promise for its response's ``kv_transfer_params``. ``block_ids``: the
        request's blocks, which vLLM frees (now or once the saves ended)."""
        st = self.requests.pop(request.request_id, None)
        if self.prefetch:
            self.freed.freed(block_ids, st.last_step if st is not None else self._step)
        if st is None:
            return False, None
        promise = self.handoff_promise(request, st)
        self._release(st)
        return self.background_saves and st.had_saves, promise

    def _release(self, st: _RequestState) -> None:
        """Drops the request's leases (usually already released by the workers)."""
        if st.lease_id is None:
            return
        lease_ids = st.leases or [lease_of_rank(st.lease_id, r) for r in range(len(self.namespaces))]
        st.lease_id = None
        st.leases = []
        if st.handed_over:
            st.handed_over = False
            self._deferred.append((self._step, lease_ids))
            return
        with contextlib.suppress(AgentError):  # the agent drops a dead session's leases itself
            self.client.release(lease_ids)

    def shutdown(self) -> None:
        self.client.close()
