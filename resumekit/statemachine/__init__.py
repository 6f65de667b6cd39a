"""The resumable transfer protocol: states, events, guards, receiver and sender drivers."""
