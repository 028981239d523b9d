"""The write side of the capture file: messages from the hooks, the writer thread, host buffers, chunk staging and
disk preallocation. The only part of ``storage`` that needs torch."""
