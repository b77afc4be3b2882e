"""Live migration: not implemented yet.

What it will build on already exists: `nvme.controller.Controller.snapshot()/restore()`
(registers, admin/I-O queue records, features, AER state, error log, shadow doorbells,
as plain msgpack-able dicts) and the coordinator's quiesce barrier.
"""
