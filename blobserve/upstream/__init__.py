"""
Talking to upstream registries: the client for blobs and manifests, and
their token authentication. It imports nothing of the store or of serving.
"""
