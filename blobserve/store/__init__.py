"""
The store: blobs on a local file system (L{blobserve.store.files}) and what is
known of them. It imports nothing of HTTP or the upstream.
"""
