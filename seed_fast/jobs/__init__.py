"""Jobs over whole datasets, one process or one per GPU under torchrun.

- `seed_fast.jobs.tokenize_dataset.tokenize_dataset`: a folder of images or webdataset tar shards ->
  code shards, resumable (`seed-fast tokenize-dataset`, `torchrun -m seed_fast.jobs.tokenize_dataset`).

Nothing is re-exported here: the module and its function share a name, and the package attribute
would be the module once it is imported.
"""
