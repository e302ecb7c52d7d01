"""callguard inside Kamailio: the KEMI plug-in for ``app_python3`` and the decider process.

- :mod:`.kemi` — the routing class Kamailio calls (``config/kamailio/callguard_kemi.py`` loads it).
- :mod:`.daemon` — the decider: one guard for all workers over a Unix datagram socket.
- :mod:`.protocol` — the decider's compact, versioned wire format.
- :mod:`.native_lists` — lists exported as db_text tables for ``kamailio-native.cfg``.

``python -m callguard.kamailio`` prints the ``CG_PYTHONPATH`` value for this environment.
"""
