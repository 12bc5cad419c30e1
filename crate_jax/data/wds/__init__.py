"""Webdataset tar shards as img2dataset writes them, read resumably (see `reader`)."""
