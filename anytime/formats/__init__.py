"""The on-disk formats, one owning module each, all torch-free (json, hashlib, numpy, pillow):

- `anytime.formats.rundir`: the run directory `anytime train` writes (file names, reading its records);
- `anytime.formats.bundle`: the bundle `anytime export` writes (manifest schema, constants, reading,
  integrity checks);
- `anytime.formats.preprocessing`: how pixels become a network input (decoding, resize, crop,
  normalisation), used by training's evaluation transform, by export's manifest and by the runtime;
- `anytime.formats.pathlist`: Parquet or JSONL files that list the images `anytime serve` classifies.

Writers live with the code that produces the content (training, export); they take the names and the
schema from here.
"""
