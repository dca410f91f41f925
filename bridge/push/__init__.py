"""The cloud side: signing, retry policy, the HTTP client and the pusher workers."""
