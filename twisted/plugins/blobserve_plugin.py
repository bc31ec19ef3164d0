from twisted.application.service import ServiceMaker

blobserve = ServiceMaker(
    "blobserve",
    "blobserve.tap",
    "A pull-through cache for OCI registry blobs.",
    "blobserve",
)
