from blobserve.prefetch.cli import main

main()
