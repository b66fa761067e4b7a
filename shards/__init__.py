"""Tools that write and check webdataset shards."""
