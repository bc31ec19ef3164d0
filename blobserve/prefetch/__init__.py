"""
C{blobserve-prefetch}: warm a running blobserve with whole images.

A client of blobserve's HTTP API only: it imports blobserve's parsers
(names, digests) and nothing of the service.
"""
