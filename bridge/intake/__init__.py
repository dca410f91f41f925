"""Intake: the MQTT edge (the service's one paho session), mapping (pure) and ingest.

A message flows ``mqtt`` -> ``ingest`` (mapped by ``mapping``) -> the spool, and is
acknowledged to the broker only after its reading or dead letter is committed.
"""
