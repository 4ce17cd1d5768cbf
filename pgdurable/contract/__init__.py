"""The contract a user writes against: machines, steps, jobs, outcomes, insert specs, errors.

Its modules import nothing else of pgdurable. ``errors``, ``spec`` and ``outcomes`` are light
(the client uses them); ``fsm`` is the machine machinery, which the client never imports.
"""
