"""Sessions and task records in Redis (``--state redis://HOST:PORT/DB``), shared by every server using it.

The same two registries as ``server/sessions.py`` keeps in memory, so that a client may use any server:
a taskUUID is used once over all of them, getResponse and cancelTask answer on any of them, and a
session resumes on any of them. Keys, all under ``imagewire:``:

    task:OWNER:UUID             the record (JSON: type, status, errors, the server running it), SET NX by begin
    task:OWNER:UUID:items       its result items for getResponse (a list of JSON objects)
    task:OWNER:UUID:progress    percent done, while it runs
    task:OWNER:UUID:lease       exists while the server running it is alive: it renews it every LEASE / 3 s
    task:OWNER:UUID:dropped     its items were let go to stay within the bound
    task:OWNER:UUID:followers   sessions that asked getResponse on another server while it ran (a set): the
                                server running an async task pushes each later result, and its error, to their
                                outboxes
    kept, kept:bytes, kept:total   finished tasks holding items, by finish time; their sizes; the sum
    kept:last                   the score of the latest finish (finishes in one ms are ordered after it)
    session:UUID                the session (hash: owner, the server its socket is attached to, if any)
    session:UUID:outbox         frames produced while no socket takes them (a list), and :outbox-bytes

Each server listens on one channel, ``imagewire:gateway:ID``: a frame pushed to the outbox of a session
attached there is announced on it (the server then moves the outbox to the socket), and cancelTask for a task
running there is asked on it. OWNER is ``owner_token(api key)``, never the key itself.

What needs several steps at once is a Lua script, which Redis runs atomically. A Redis that stops
answering fails new work with ``serviceUnavailable``; tasks already running carry on and deliver on their
own socket, and what they could not write is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Coroutine, Iterator, Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from imagewire.server.config import shown_url
from imagewire.server.protocol import encode_frame
from imagewire.server.sessions import ClientSession, Sender, TaskRecord, conflict
from imagewire.tasks.errors import ServiceUnavailable

log = logging.getLogger("imagewire.state")

PREFIX = "imagewire:"
LEASE_SECONDS = 10.0         # a running task's record says "processing" this long after its server was last heard of
CALL_TIMEOUT_SECONDS = 5.0   # connect and each reply; one retry, without waiting, on a dropped connection
CANCEL_REPLY_SECONDS = 2.0   # the running server's answer to a cancelTask asked on another
WARN_INTERVAL_SECONDS = 10.0


class StateUnavailable(ServiceUnavailable):
    """Redis did not answer: what the client is told names no host, only what failed."""

    def __init__(self) -> None:
        super().__init__("The server's shared state (Redis) cannot be reached; send the task again shortly.")


# Keeps the sum of finished tasks' items within the bound: forgets members older than the retention (their
# items have expired), then lets go of the oldest until the sum fits. KEYS: kept, kept:bytes, kept:total.
# Keys derived from members are touched too: fine on one Redis, not for Redis Cluster.
_TIDY = """
local function forget(member, drop)
  local size = tonumber(redis.call('HGET', KEYS[2], member) or '0')
  redis.call('HDEL', KEYS[2], member)
  redis.call('ZREM', KEYS[1], member)
  redis.call('DECRBY', KEYS[3], size)
  if drop then
    local record = ARGV[1] .. member
    local ttl = redis.call('PTTL', record)
    redis.call('DEL', record .. ':items')
    if ttl > 0 then redis.call('SET', record .. ':dropped', '1', 'PX', ttl) end
  end
end
local function tidy(retention_ms, max_bytes)
  local now = redis.call('TIME')
  local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms - retention_ms, 'LIMIT', 0, 1000)) do
    forget(member, false)
  end
  local dropped = 0
  while tonumber(redis.call('GET', KEYS[3]) or '0') > max_bytes do
    local oldest = redis.call('ZRANGE', KEYS[1], 0, 0)
    if #oldest == 0 then break end
    forget(oldest[1], true)
    dropped = dropped + 1
  end
  return {now_ms, dropped}
end
"""

# ARGV: prefix, retention ms, max bytes.
SWEEP = _TIDY + "return tidy(tonumber(ARGV[2]), tonumber(ARGV[3]))[2]"

# The record is created only if the UUID is free (SET NX), with its lease. KEYS: record, lease.
# ARGV: record JSON, record ttl ms, lease ms.
BEGIN = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
return 1
"""

# KEYS: kept, kept:bytes, kept:total, record, items, lease, kept:last. ARGV: prefix, retention ms, max bytes,
# record JSON, member, bytes of its items. A finish is scored by its time in ms, and a finish in the same ms as
# the last one a thousandth after it (written with %.3f: Lua would print the number with 14 digits only), so that
# "oldest first" never falls back on the order of the members' names. Returns the sessions that followed the task,
# taken in the step that writes its status: a getResponse reading before it follows, one reading after sees the end.
FINISH = _TIDY + """
local followers = redis.call('SMEMBERS', KEYS[4] .. ':followers')
redis.call('DEL', KEYS[4] .. ':followers')
redis.call('SET', KEYS[4], ARGV[4], 'PX', ARGV[2])
redis.call('PEXPIRE', KEYS[5], ARGV[2])
redis.call('DEL', KEYS[6])
if redis.call('HEXISTS', KEYS[2], ARGV[5]) == 1 then forget(ARGV[5], false) end
local bytes = tonumber(ARGV[6])
local dropped = 0
if bytes > 0 then
  local now = redis.call('TIME')
  local score = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  score = string.format('%.3f', math.max(score, tonumber(redis.call('GET', KEYS[7]) or '0') + 0.001))
  redis.call('SET', KEYS[7], score)
  redis.call('ZADD', KEYS[1], score, ARGV[5])
  redis.call('HSET', KEYS[2], ARGV[5], bytes)
  redis.call('INCRBY', KEYS[3], bytes)
end
tidy(tonumber(ARGV[2]), tonumber(ARGV[3]))
return followers
"""

# Frames into a session's outbox, at its end or (``front``) ahead of it, oldest let go past the bound, and the
# server its socket is attached to told. KEYS: outbox, outbox-bytes, session. ARGV: max bytes, ttl ms, front,
# channel prefix, session UUID, frames...
PUSH = """
local total = 0
if ARGV[3] == '1' then
  for i = #ARGV, 6, -1 do redis.call('LPUSH', KEYS[1], ARGV[i]); total = total + #ARGV[i] end
else
  for i = 6, #ARGV do redis.call('RPUSH', KEYS[1], ARGV[i]); total = total + #ARGV[i] end
end
local kept = redis.call('INCRBY', KEYS[2], total)
while kept > tonumber(ARGV[1]) and redis.call('LLEN', KEYS[1]) > 1 do
  kept = redis.call('DECRBY', KEYS[2], #redis.call('LPOP', KEYS[1]))
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
local gateway = redis.call('HGET', KEYS[3], 'gateway')
if gateway and gateway ~= '' then redis.call('PUBLISH', ARGV[4] .. gateway, 'session ' .. ARGV[5]) end
return kept
"""

# The oldest frame of an outbox. KEYS: outbox, outbox-bytes.
POP = """
local frame = redis.call('LPOP', KEYS[1])
if frame then redis.call('DECRBY', KEYS[2], #frame) end
return frame
"""

# A socket left: the session waits the resume window, unless another server has its socket by now.
# KEYS: session, outbox, outbox-bytes. ARGV: this server's id, resume window ms.
DETACH = """
if redis.call('HGET', KEYS[1], 'gateway') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'gateway', '')
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[2]) end
return 1
"""

# An attached session's record outlives the resume window while its socket is here, and comes back if Redis lost
# it (a restart without persistence), unless another server has the socket by now. KEYS: session.
# ARGV: owner, this server's id, ttl ms.
RENEW_SESSION = """
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'gateway', ARGV[2]) end
if redis.call('HGET', KEYS[1], 'gateway') == ARGV[2] then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return 1
"""


@contextlib.contextmanager
def shared() -> Iterator[None]:
    """Redis's failures as the client's ``serviceUnavailable``."""
    try:
        yield
    except (RedisError, OSError) as exc:
        raise StateUnavailable() from exc


class RedisState:
    """One server's link to Redis: the client, the channel it listens on, and the renewal of its leases."""

    def __init__(self, client: aioredis.Redis, url: str, *, lease: float = LEASE_SECONDS) -> None:
        self.client = client
        self.url = url
        self.lease = lease
        self.gateway = uuid.uuid4().hex[:16]
        self.tasks: RedisTaskRegistry | None = None
        self.sessions: RedisSessionRegistry | None = None
        self._pubsub = client.pubsub()
        self._background: set[asyncio.Task[Any]] = set()
        self._last_warning = 0.0

    @classmethod
    async def connect(cls, url: str, *, lease: float = LEASE_SECONDS) -> RedisState:
        """Connected and answering; ValueError naming the URL and the cause when not (the server must not start)."""
        client = aioredis.Redis.from_url(url, socket_timeout=CALL_TIMEOUT_SECONDS,
                                         socket_connect_timeout=CALL_TIMEOUT_SECONDS, retry=Retry(NoBackoff(), 1))
        try:
            await client.ping()
        except AuthenticationError as exc:
            await client.aclose()
            raise ValueError(f"--state {shown_url(url)}: Redis refused the credentials ({exc})") from None
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            await client.aclose()
            raise ValueError(f"--state {shown_url(url)}: cannot reach Redis ({_cause(exc)})") from None
        except RedisError as exc:
            await client.aclose()
            raise ValueError(f"--state {shown_url(url)}: Redis refused ({exc})") from None
        return cls(client, url, lease=lease)

    def channel(self, gateway: str) -> str:
        return f"{PREFIX}gateway:{gateway}"

    def task_registry(self, *, retention: float, max_kept_bytes: int) -> RedisTaskRegistry:
        self.tasks = RedisTaskRegistry(self, retention=retention, max_kept_bytes=max_kept_bytes)
        return self.tasks

    def session_registry(self, *, resume_window: float, max_outbox_bytes: int) -> RedisSessionRegistry:
        self.sessions = RedisSessionRegistry(self, resume_window=resume_window, max_outbox_bytes=max_outbox_bytes)
        return self.sessions

    async def start(self) -> None:
        """Listen on this server's channel; ValueError (the server must not start) when Redis fails now."""
        try:
            await self._pubsub.subscribe(self.channel(self.gateway))
        except (RedisError, OSError) as exc:
            raise ValueError(f"--state {shown_url(self.url)}: cannot subscribe to Redis ({_cause(exc)})") from None
        self.soon(self._listen())
        self.soon(self._renew_forever())
        log.info("shared state in %s (this server: %s)", shown_url(self.url), self.gateway)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        with contextlib.suppress(RedisError, OSError):
            await self._pubsub.aclose()
        await self.client.aclose()

    def soon(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run ``work`` in its own task, held here until it is done."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def warn(self, what: str, exc: BaseException) -> None:
        """A failed background write: logged, at most one line each WARN_INTERVAL_SECONDS."""
        now = time.monotonic()
        if now - self._last_warning >= WARN_INTERVAL_SECONDS:
            self._last_warning = now
            log.warning("Redis at %s failed (%s): %s; serving goes on", shown_url(self.url), what, exc)

    async def _listen(self) -> None:
        while True:
            try:
                message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except Exception as exc:  # the listener must outlive any failure; it reconnects
                self.warn("listening on this server's channel", exc)
                await asyncio.sleep(1.0)
                continue
            if message is None or message.get("type") != "message":
                continue
            data: bytes = message["data"]
            kind, _, rest = data.partition(b" ")
            try:
                if kind == b"session" and self.sessions is not None:
                    self.sessions.announced(rest.decode())
                elif kind == b"cancel" and self.tasks is not None:
                    self.soon(self.tasks.cancel_asked(orjson.loads(rest)))
            except ValueError:  # not one of ours (a hand-made PUBLISH): ignored
                log.warning("ignored a message on this server's Redis channel: %r", data[:200])

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    if self.tasks is not None:
                        self.tasks.renew(pipe)
                    if self.sessions is not None:
                        await self.sessions.renew(pipe)
                    await pipe.execute()
            except Exception as exc:  # renewal goes on, whatever one round failed of
                self.warn("renewing leases", exc)


def _cause(exc: BaseException) -> str:
    """The system's words for a failed connection ("Connection refused"), rather than redis-py's sentence."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return os.strerror(seen.errno)
        if isinstance(seen, (TimeoutError, RedisTimeoutError)):
            return f"no answer within {CALL_TIMEOUT_SECONDS:g} s"
        seen = seen.__cause__ or seen.__context__
    return str(exc)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class RedisTaskRegistry:
    """``Tasks`` in Redis. The records of tasks running here are kept here too: their ``stop``, and their
    leases to renew."""

    def __init__(self, state: RedisState, *, retention: float, max_kept_bytes: int) -> None:
        self.state = state
        self.retention = retention
        self.max_kept_bytes = max_kept_bytes
        self._running: dict[tuple[str, str], TaskRecord] = {}
        self._progress_due: dict[tuple[str, str], TaskRecord] = {}
        client = state.client
        self._begin = client.register_script(BEGIN)
        self._finish = client.register_script(FINISH)
        self._sweep = client.register_script(SWEEP)

    @staticmethod
    def member(owner: str, task_uuid: str) -> str:
        return f"{owner}:{task_uuid}"

    def key(self, owner: str, task_uuid: str) -> str:
        return f"{PREFIX}task:{owner}:{task_uuid}"

    @property
    def _running_ttl(self) -> int:
        # A record outlives a server that died running it by the retention: long enough to be told so.
        return _ms(self.state.lease + self.retention)

    def _kept_keys(self) -> list[str]:
        return [f"{PREFIX}kept", f"{PREFIX}kept:bytes", f"{PREFIX}kept:total"]

    def _state(self, record: TaskRecord) -> bytes:
        return orjson.dumps({"type": record.task_type, "status": record.status, "errors": record.errors,
                             "gateway": self.state.gateway, "expires": record.expires})

    async def begin(self, task_uuid: str, task_type: str, owner: str) -> TaskRecord:
        record = TaskRecord(task_uuid, task_type, owner)
        key = self.key(owner, task_uuid)
        with shared():
            created = await self._begin(keys=[key, f"{key}:lease"],
                                        args=[self._state(record), self._running_ttl, _ms(self.state.lease)])
        if not created:
            raise conflict(task_uuid, self.retention)
        self._running[owner, task_uuid] = record
        return record

    async def keep(self, record: TaskRecord, item: dict[str, Any]) -> None:
        encoded = orjson.dumps(item)
        record.kept_bytes += len(encoded)
        key = self.key(record.owner, record.task_uuid)
        try:
            # One transaction: a getResponse that subscribes with its read (``get``) either reads this item or
            # is among the followers it is pushed to, never both.
            async with self.state.client.pipeline(transaction=record.pushes) as pipe:
                pipe.rpush(f"{key}:items", encoded)
                pipe.pexpire(f"{key}:items", self._running_ttl)
                if record.pushes:
                    pipe.smembers(f"{key}:followers")
                replies = await pipe.execute()
        except (RedisError, OSError) as exc:
            self.state.warn(f"keeping a result of taskUUID={record.task_uuid}", exc)
            return
        if record.pushes:
            await self._push(record, replies[2], data=[{**item, "status": "success"}])

    async def _push(self, record: TaskRecord, followers: Any, *, data: Sequence[dict[str, Any]] = (),
                    errors: Sequence[dict[str, Any]] = ()) -> None:
        """A frame for the task to each session that followed it from another server, into its outbox (which
        announces it to the server holding its socket)."""
        if not followers or self.state.sessions is None:
            return
        frame = encode_frame(data=list(data), errors=list(errors))
        for follower in followers:
            await self.state.sessions.push(follower.decode() if isinstance(follower, bytes) else str(follower),
                                           [frame], front=False)

    def progress(self, record: TaskRecord, percent: int) -> None:
        record.progress = percent
        key = (record.owner, record.task_uuid)
        if key not in self._progress_due:  # one write on its way at a time; it writes the latest percent
            self._progress_due[key] = record
            self.state.soon(self._write_progress(key))

    async def _write_progress(self, key: tuple[str, str]) -> None:
        record = self._progress_due.pop(key)
        try:
            await self.state.client.set(f"{self.key(*key)}:progress", record.progress or 0, px=self._running_ttl)
        except (RedisError, OSError) as exc:
            self.state.warn(f"noting the progress of taskUUID={record.task_uuid}", exc)

    async def finish(self, record: TaskRecord, status: str) -> None:
        record.status = status
        record.finished_at = time.monotonic()
        record.stop = None
        self._running.pop((record.owner, record.task_uuid), None)
        key = self.key(record.owner, record.task_uuid)
        try:
            followers = await self._finish(
                keys=[*self._kept_keys(), key, f"{key}:items", f"{key}:lease", f"{PREFIX}kept:last"],
                args=[f"{PREFIX}task:", _ms(self.retention), self.max_kept_bytes, self._state(record),
                      self.member(record.owner, record.task_uuid), record.kept_bytes])
        except (RedisError, OSError) as exc:
            self.state.warn(f"recording the end of taskUUID={record.task_uuid}", exc)
            return
        if record.pushes and status == "error" and record.errors:
            await self._push(record, followers, errors=[{**record.errors[0], "status": "error"}])

    async def get(self, task_uuid: str, owner: str, follower: str | None = None) -> TaskRecord | None:
        key = self.key(owner, task_uuid)
        with shared():
            async with self.state.client.pipeline(transaction=True) as pipe:
                pipe.get(key)
                pipe.lrange(f"{key}:items", 0, -1)
                pipe.exists(f"{key}:lease")
                pipe.exists(f"{key}:dropped")
                pipe.get(f"{key}:progress")
                if follower is not None and (owner, task_uuid) not in self._running:
                    # Subscribed in the same transaction as the read (see ``keep`` and FINISH). A task that has
                    # ended, or runs sync, never reads the set, which expires with the record.
                    pipe.sadd(f"{key}:followers", follower)
                    pipe.pexpire(f"{key}:followers", self._running_ttl)
                raw, items, leased, dropped, progress, *_ = await pipe.execute()
        if raw is None:
            return None
        saved = orjson.loads(raw)
        record = TaskRecord(task_uuid, saved["type"], owner, status=saved["status"], errors=saved["errors"],
                            items=[orjson.loads(item) for item in items], items_dropped=bool(dropped),
                            expires=saved.get("expires"))
        if record.status == "processing":
            record.progress = int(progress) if progress is not None else None
            if not leased:
                # Its server stopped (or lost Redis) while it ran: it will never finish.
                record.status = "error"
                record.errors = [ServiceUnavailable(
                    f"The server running task {task_uuid} stopped before it finished; send it again with a new "
                    "taskUUID.").to_item(record.task_type, task_uuid)]
        return record

    async def cancel(self, task_uuid: str, owner: str) -> bool | None:
        local = self._running.get((owner, task_uuid))
        if local is not None and local.stop is not None:
            # Taken as it is used: of several cancels for one task, only the first stops it.
            stop, local.stop = local.stop, None
            stop()
            return True
        key = self.key(owner, task_uuid)
        with shared():
            async with self.state.client.pipeline(transaction=True) as pipe:
                pipe.get(key)
                pipe.exists(f"{key}:lease")
                raw, leased = await pipe.execute()
        if raw is None:
            return None
        saved = orjson.loads(raw)
        if saved["status"] != "processing" or not leased or saved["gateway"] == self.state.gateway:
            return False  # ended, or its server stopped, or it ran here and is over
        # Ask the server running it, and wait for its answer on a list of our own.
        reply = f"{PREFIX}reply:{uuid.uuid4().hex}"
        request = orjson.dumps({"owner": owner, "taskUUID": task_uuid, "reply": reply})
        with shared():
            if not await self.state.client.publish(self.state.channel(saved["gateway"]), b"cancel " + request):
                return False
            answer = await self.state.client.blpop([reply], timeout=CANCEL_REPLY_SECONDS)
        return answer is not None and answer[1] == b"1"

    async def cancel_asked(self, request: dict[str, str]) -> None:
        """Another server's cancelTask for a task that may be running here."""
        local = self._running.get((request["owner"], request["taskUUID"]))
        stopped = local is not None and local.stop is not None
        if local is not None and local.stop is not None:
            stop, local.stop = local.stop, None
            stop()
        try:
            async with self.state.client.pipeline(transaction=False) as pipe:
                pipe.rpush(request["reply"], b"1" if stopped else b"0")
                pipe.pexpire(request["reply"], _ms(CANCEL_REPLY_SECONDS * 5))
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self.state.warn(f"answering a cancelTask for taskUUID={request['taskUUID']}", exc)

    def renew(self, pipe: Any) -> None:
        for owner, task_uuid in self._running:
            key = self.key(owner, task_uuid)
            pipe.set(f"{key}:lease", b"1", px=_ms(self.state.lease))
            for name in (key, f"{key}:items", f"{key}:progress", f"{key}:followers"):
                pipe.pexpire(name, self._running_ttl)

    async def sweep(self) -> int:
        """Redis expires records itself; this forgets expired members of the bound's accounting."""
        try:
            await self._sweep(keys=self._kept_keys(), args=[f"{PREFIX}task:", _ms(self.retention), self.max_kept_bytes])
        except (RedisError, OSError) as exc:
            self.state.warn("sweeping task records", exc)
        return 0

    def __len__(self) -> int:
        return len(self._running)


class RedisSession:
    """A session as one server sees it: frames go to its socket when attached here, else to the outbox in Redis,
    which the server holding its socket (if any) is told of."""

    def __init__(self, registry: RedisSessionRegistry, session_uuid: str, owner: str) -> None:
        self.registry = registry
        self.uuid = session_uuid
        self.owner = owner
        self.sender: Sender | None = None
        self._draining = asyncio.Lock()

    async def send(self, frame: bytes) -> None:
        if self.sender is not None and not self._draining.locked():
            if not await self.sender(frame):
                await self.registry.push(self.uuid, [frame], front=False)
            return
        await self.registry.push(self.uuid, [frame], front=False)
        if self.sender is not None:
            # The outbox is being moved to the socket just attached here: this frame goes behind it, so that each
            # task's frames reach the client in the order they were made.
            await self.drain()

    async def keep(self, frames: list[bytes]) -> None:
        if frames:
            await self.registry.push(self.uuid, frames, front=True)

    async def detach(self, sender: Sender) -> None:
        if self.sender == sender:
            self.sender = None
            await self.registry.detached(self)

    async def attach(self, sender: Sender) -> None:
        self.sender = sender
        await self.registry.attached(self)
        await self.drain()

    async def drain(self) -> None:
        """Move the outbox, oldest first, to the attached socket."""
        async with self._draining:
            while self.sender is not None:
                frame = await self.registry.pop(self.uuid)
                if frame is None:
                    return
                if not await self.sender(frame):
                    await self.registry.push(self.uuid, [frame], front=True)
                    return


class RedisSessionRegistry:
    """``Sessions`` in Redis. The sessions whose socket is attached here are kept here too."""

    def __init__(self, state: RedisState, *, resume_window: float, max_outbox_bytes: int) -> None:
        self.state = state
        self.resume_window = resume_window
        self.max_outbox_bytes = max_outbox_bytes
        self._local: dict[str, RedisSession] = {}
        client = state.client
        self._push = client.register_script(PUSH)
        self._pop = client.register_script(POP)
        self._detach = client.register_script(DETACH)
        self._renew = client.register_script(RENEW_SESSION)

    def keys(self, session_uuid: str) -> list[str]:
        """The session, its outbox, the outbox's size in bytes."""
        key = f"{PREFIX}session:{session_uuid}"
        return [key, f"{key}:outbox", f"{key}:outbox-bytes"]

    @property
    def _attached_ttl(self) -> int:
        return _ms(self.resume_window + self.state.lease)

    async def open(self, owner: str, resume_uuid: str | None) -> tuple[ClientSession, bool]:
        with shared():
            if resume_uuid is not None:
                known = await self.state.client.hget(self.keys(resume_uuid)[0], "owner")
                if known == owner.encode():
                    return self._session(resume_uuid, owner), True
            session_uuid = str(uuid.uuid4())
            key = self.keys(session_uuid)[0]
            async with self.state.client.pipeline(transaction=True) as pipe:
                pipe.hset(key, mapping={"owner": owner, "gateway": ""})
                pipe.pexpire(key, self._attached_ttl)
                await pipe.execute()
        return self._session(session_uuid, owner), False

    def _session(self, session_uuid: str, owner: str) -> RedisSession:
        session = self._local.get(session_uuid)
        if session is None:
            session = self._local[session_uuid] = RedisSession(self, session_uuid, owner)
        return session

    async def attached(self, session: RedisSession) -> None:
        key = self.keys(session.uuid)[0]
        try:
            async with self.state.client.pipeline(transaction=True) as pipe:
                pipe.hset(key, mapping={"owner": session.owner, "gateway": self.state.gateway})
                pipe.pexpire(key, self._attached_ttl)
                await pipe.execute()
        except (RedisError, OSError) as exc:  # the socket still takes what is produced here
            self.state.warn(f"attaching session={session.uuid}", exc)

    async def detached(self, session: RedisSession) -> None:
        if self._local.get(session.uuid) is session:
            del self._local[session.uuid]
        try:
            await self._detach(keys=self.keys(session.uuid), args=[self.state.gateway, _ms(self.resume_window)])
        except (RedisError, OSError) as exc:
            self.state.warn(f"detaching session={session.uuid}", exc)

    async def push(self, session_uuid: str, frames: list[bytes], *, front: bool) -> None:
        try:
            session, outbox, outbox_bytes = self.keys(session_uuid)
            await self._push(keys=[outbox, outbox_bytes, session],
                             args=[self.max_outbox_bytes, _ms(self.resume_window), "1" if front else "0",
                                   f"{PREFIX}gateway:", session_uuid, *frames])
        except (RedisError, OSError) as exc:
            self.state.warn(f"keeping {len(frames)} frames for session={session_uuid}", exc)

    async def pop(self, session_uuid: str) -> bytes | None:
        try:
            frame: bytes | None = await self._pop(keys=self.keys(session_uuid)[1:])
        except (RedisError, OSError) as exc:
            self.state.warn(f"reading the outbox of session={session_uuid}", exc)
            return None
        return frame

    def announced(self, session_uuid: str) -> None:
        """A frame is waiting in the outbox of a session whose socket may be attached here."""
        session = self._local.get(session_uuid)
        if session is not None and session.sender is not None:
            self.state.soon(session.drain())

    async def renew(self, pipe: Any) -> None:
        for session_uuid, session in list(self._local.items()):
            if session.sender is not None:
                await self._renew(keys=self.keys(session_uuid)[:1],
                            args=[session.owner, self.state.gateway, self._attached_ttl], client=pipe)

    async def sweep(self) -> int:
        return 0  # Redis expires sessions and outboxes itself

    def __len__(self) -> int:
        return len(self._local)
