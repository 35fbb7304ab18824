"""Asynchronous SGD, emulated exactly: a parameter server, stale workers, delays, pauses and the SSP gate.

A real parameter server cannot be studied reproducibly: who delivers when depends on the machine. Here the
whole schedule is drawn from the key in the state (``init(params, key=...)``), so a run is a pure function of
(state, batches) and is repeated bit for bit. One ``step`` is one server tick; every worker computes a
gradient each tick on the copy of the parameters it last pulled (``jax.vmap`` over its workers on each device
of a ``workers`` mesh axis), and masks say who computes, who delivers and who pulls.

One tick ``t`` (``t = state.step`` before it), in this order (each step a module-level function of an
``AsyncConfig``):

1. **Schedule** (``deliveries``). Worker ``w`` is alive while ``t < fail[w]``. An alive worker that does not
   wait at the gate computes; the delay model (``pauses`` among them) says which computing workers finish their
   gradient this tick. Every finished gradient is delivered now: none is ever held back.
2. **Gradients** (``workers_half``). Every worker's loss and gradient on its own copy and its slice
   ``batch[w]`` (the others are discarded, NaN or not).
3. **Server update** (``apply_mean`` or ``apply_each``, the user's choice, the same for every bound):
   the tick's gradients averaged into one optimizer update, or each its own update in worker order.
4. **SSP gate on reads** (``gate``). ``clock[w]`` counts the gradients ``w`` has delivered, so the gradient it
   computes next has timestamp ``clock[w]``. A worker with no gradient in progress (it delivered now, or it
   waits) pulls and starts its next gradient if ``clock[w] - min(alive clocks) <= s``; otherwise it waits,
   computing nothing, and pulls in the tick the slowest worker catches up.
5. **Pull** (``pull``): the workers that pass copy the server's parameters as they are after the tick.

This is SSP as Ho et al. (2013), "More Effective Distributed ML via a Stale Synchronous Parallel Parameter
Server", define it (Section 2):

    "(1) The slowest and fastest workers must be <= s clocks apart -- otherwise, the fastest worker is
    forced to wait for the slowest worker to catch up; (2) When a worker with clock c commits an update u,
    that u is timestamped with time c; (3) When a worker with clock c reads a model variable, it will always
    see effects from all u with timestamp <= c - s - 1. It may also see some u with timestamp > c - s - 1
    from other workers; (4) Read-my-writes: A worker p will always see the effects of its own updates u_p."

Here (2) is the clock above, (3) the gate (a worker reads only when every alive worker has delivered its
updates of timestamps <= c - s - 1), (4) holds because a worker pulls after its own update is applied, and (1)
holds for the workers that compute: their timestamps are within s of the slowest; one that has delivered the
gradient of clock m + s and waits has clock m + s + 1, so the spread of delivered counts is at most s + 1.
tests/test_async_ssp.py checks (1)-(4) from the metrics of long random runs.

Staleness, counted two ways for a delivered gradient of timestamp c:

- ``clock_staleness = c - m``, ``m`` the slowest alive clock at its pull: ``<= s`` (the gate's condition).
- ``staleness`` (tau), the server updates between its pull and its application: at most ``(N - 1)(2s + 1)``
  (plus none of its own worker's). While it is in flight its worker's clock stays c, so another worker may
  start gradients of timestamp up to c + s; at the pull it had delivered at least c - s, so it delivers at
  most 2s + 1 gradients in between, each at most one update. Reached for N = 2 by a worker that is the slowest
  at the other's pull and runs to the bound.

With ``apply="mean"`` and no pauses or delays every tick is a synchronous round: every worker delivers a
gradient taken at the current parameters and the tick equals one ``data_parallel`` step on the union of the
workers' batches (tested to 1e-5). With ``apply="each"`` the same tick makes N updates.

Layout, as a parameter server shards its variables over its server tasks: the workers' copies and batches
are split over the mesh's ``workers`` axis, ``N/D`` workers per device, and so is the server (see
``_server``). With one worker per device a tick sends what a ring all-reduce sends, ``2(D-1)/D`` of the
parameters' bytes per device, whatever the number of updates it applies.
"""
from jdist.strategies.async_sgd._batches import split_workers as split_workers
from jdist.strategies.async_sgd._config import AsyncConfig as AsyncConfig
from jdist.strategies.async_sgd._delays import DelayModel as DelayModel
from jdist.strategies.async_sgd._delays import every_tick as every_tick
from jdist.strategies.async_sgd._delays import fixed_speeds as fixed_speeds
from jdist.strategies.async_sgd._delays import geometric as geometric
from jdist.strategies.async_sgd._delays import pauses as pauses
from jdist.strategies.async_sgd._delays import uniform as uniform
from jdist.strategies.async_sgd._strategy import async_sgd as async_sgd

__all__ = ["AsyncConfig", "DelayModel", "async_sgd", "every_tick", "fixed_speeds", "geometric", "pauses",
           "split_workers", "uniform"]
