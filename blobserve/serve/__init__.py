"""
Sending blobs to clients: the producer that follows a blob as it lands, the
scheduler that shares each turn of the reactor among producers, and the
zero-copy path with its start-up self-test. It imports the store and the
writer's progress interface, nothing of routing.
"""
