"""Pure logic of ragtune's data path, with no Ray import: ids, chunking, corpus files, embedding parts, FAISS and
BM25 shards, manifests and versions, search, tuning and filters (docs/layout.md lists each module).

Functions here take arrays, tables, paths and ints and return values, so they are tested in milliseconds;
`jobs/` and `serving/` wrap them in Ray Data, Ray tasks and Serve deployments.
"""
