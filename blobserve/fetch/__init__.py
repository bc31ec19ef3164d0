"""
Fetching a blob once into the store: the chunk writer, the download with its
resumes, the single-flight table and the upstream slots. It imports the
store and the upstream, nothing of HTTP serving.
"""
