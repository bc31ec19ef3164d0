"""
The blobserve benchmark: blobserve beside its peers, on loopback, in one run.

C{python -m bench} (or C{make bench}, which installs what it needs first).
"""
