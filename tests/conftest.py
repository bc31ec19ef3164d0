"""
Settings shared by every test.
"""

from hypothesis import settings

# Bounded and free of wall-clock deadlines, so CI stays fast and steady.
settings.register_profile("blobserve", max_examples=200, deadline=None)
settings.load_profile("blobserve")
