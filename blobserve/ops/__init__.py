"""
What operators watch blobserve by: metrics, health, the access log and the
status page. It may import every package but L{blobserve.web}.
"""
