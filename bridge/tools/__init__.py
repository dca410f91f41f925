"""Tools that stand in for the world around the bridge; not part of the service.

The cloud stand-in (``cloud_stub``), a meter simulator (``simulate``) and the demo that runs
them all (``demo``). Installable, so the compose stack can run them from the image.
"""
