"""The process around the science: atomic writes, devices and CPU threads."""
