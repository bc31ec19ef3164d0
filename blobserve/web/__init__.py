"""
The HTTP face: the site and its bounds, the registry API's routes, the
manifest cache, and the parsing of what clients send. It may import every
other package; none imports it.
"""
