"""pmemfs: a userspace persistent-memory emulator (PMEM ram disk, DAX view, page registry) over FUSE."""

__version__ = "0.1.0"
