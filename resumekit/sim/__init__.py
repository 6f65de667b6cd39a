"""Simulators over the real protocol objects: one transfer in process (:mod:`.simulate`),
a sender and a receiver in two processes (:mod:`.twoprocess`), and traces replayed on
a virtual clock against the landing designs engines ship (:mod:`.workload`)."""
