"""The ways of training, one module (or package) each; their factories are re-exported as ``jdist.*``.

- ``data_parallel``: synchronous data parallelism (shard_map or pmap), gradients averaged by a reducer.
- ``local_sgd``: model averaging every H steps (local SGD, DiLoCo).
- ``async_sgd``: asynchronous SGD on an emulated parameter server (delay models, the SSP gate).
- ``pipeline``: layers split over devices, micro-batches flowing through them (GPipe, circular, 1F1B).
- ``model_parallel``: sharding rules as data, ``sharded`` (GSPMD), ``fsdp`` (shard_map), TP layers.

Every factory returns a ``jdist.Strategy`` of pure functions: ``init``, ``shard_batch``, ``step``.
"""
