"""
blobserve: a pull-through cache for OCI registry blobs.

A blob that is not yet stored is fetched from the upstream registry once,
however many clients ask for it, and streamed to all of them while it lands
on disk.
"""
